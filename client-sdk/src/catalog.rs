//! Catalog entry files (TOML/JSON) — filled in by the catalog work.
