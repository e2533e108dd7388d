//! Records (placeholder: being written).
