//! The two national identifiers every record is keyed by, validated exactly as in
//! `shared/reference/identifiers.md`, and the masked form of identity numbers.

/// Why an identifier was refused; the text names the position and the expected character where useful.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("must be 18 characters, got {0}")]
    Length(usize),
    #[error("character {pos} ({ch:?}) is not allowed here: {allowed}")]
    Character { pos: usize, ch: char, allowed: &'static str },
    #[error("check character is {found:?}, expected {expected:?}")]
    Check { found: char, expected: char },
    #[error("birth date {0} is not a real calendar date")]
    BadDate(String),
    #[error("birth date {0} is in the future")]
    FutureDate(String),
}

const USCC_ALPHABET: &[u8; 31] = b"0123456789ABCDEFGHJKLMNPQRTUWXY";
const USCC_WEIGHTS: [u32; 17] = [1, 3, 9, 27, 19, 26, 16, 17, 20, 29, 25, 13, 8, 24, 10, 30, 28];

/// Validates a unified social credit code (GB 32100-2015). Only the canonical upper-case form is valid.
pub fn validate_uscc(code: &str) -> Result<(), IdError> {
    let chars: Vec<char> = code.chars().collect();
    if chars.len() != 18 {
        return Err(IdError::Length(chars.len()));
    }
    let mut sum = 0u32;
    let mut values = [0u32; 18];
    for (i, &c) in chars.iter().enumerate() {
        let v = u8::try_from(c).ok().and_then(|b| USCC_ALPHABET.iter().position(|a| *a == b)).ok_or(
            IdError::Character { pos: i + 1, ch: c, allowed: "digits and upper-case letters except I, O, S, V, Z" },
        )?;
        values[i] = v as u32;
    }
    for i in 0..17 {
        sum += values[i] * USCC_WEIGHTS[i];
    }
    let check = (31 - sum % 31) % 31;
    let expected = USCC_ALPHABET[check as usize] as char;
    if chars[17] != expected {
        return Err(IdError::Check { found: chars[17], expected });
    }
    Ok(())
}

const ID_WEIGHTS: [u32; 17] = [7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2];
const ID_CHECK: &[u8; 11] = b"10X98765432";

/// Validates a citizen identity number (GB 11643-1999) against today's date.
pub fn validate_identity_number(id: &str) -> Result<(), IdError> {
    let today = time::OffsetDateTime::now_utc().date();
    validate_identity_number_on(id, today)
}

/// As [`validate_identity_number`], with "today" given (for tests).
pub fn validate_identity_number_on(id: &str, today: time::Date) -> Result<(), IdError> {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() != 18 {
        return Err(IdError::Length(chars.len()));
    }
    let mut sum = 0u32;
    for i in 0..17 {
        let d = chars[i]
            .to_digit(10)
            .filter(|_| chars[i].is_ascii_digit())
            .ok_or(IdError::Character { pos: i + 1, ch: chars[i], allowed: "digits 0-9" })?;
        sum += d * ID_WEIGHTS[i];
    }
    let last = chars[17];
    if !(last.is_ascii_digit() || last == 'X') {
        return Err(IdError::Character { pos: 18, ch: last, allowed: "a digit or upper-case X" });
    }
    let expected = ID_CHECK[(sum % 11) as usize] as char;
    if last != expected {
        return Err(IdError::Check { found: last, expected });
    }
    let date: String = chars[6..14].iter().collect();
    let year: i32 = date[0..4].parse().expect("digits");
    let month: u8 = date[4..6].parse().expect("digits");
    let day: u8 = date[6..8].parse().expect("digits");
    let birth = time::Month::try_from(month)
        .ok()
        .and_then(|m| time::Date::from_calendar_date(year, m, day).ok())
        .ok_or_else(|| IdError::BadDate(date.clone()))?;
    if birth > today {
        return Err(IdError::FutureDate(date));
    }
    Ok(())
}

/// The masked display form: first 6 and last 4 characters kept (`110105********002X`).
pub fn mask_identity_number(id: &str) -> String {
    let chars: Vec<char> = id.chars().collect();
    if chars.len() <= 10 {
        return "*".repeat(chars.len());
    }
    let mut out: String = chars[..6].iter().collect();
    out.extend(std::iter::repeat_n('*', chars.len() - 10));
    out.extend(&chars[chars.len() - 4..]);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uscc_reference_vectors() {
        assert_eq!(validate_uscc("91350100M000100Y43"), Ok(()));
        assert_eq!(validate_uscc("91310115MA1H8R7C6D"), Err(IdError::Check { found: 'D', expected: '7' }));
        assert!(matches!(validate_uscc("91350100M000100I43"), Err(IdError::Character { pos: 16, .. })));
        for bad in ['I', 'O', 'S', 'V', 'Z'] {
            let code = format!("9135010{bad}M000100Y43");
            assert!(matches!(validate_uscc(&code), Err(IdError::Character { pos: 8, .. })), "{code}");
        }
        assert!(matches!(validate_uscc("91350100m000100Y43"), Err(IdError::Character { pos: 9, .. })));
        assert_eq!(validate_uscc("91350100M000100Y4"), Err(IdError::Length(17)));
    }

    #[test]
    fn identity_reference_vectors() {
        let today = time::Date::from_calendar_date(2026, time::Month::November, 22).unwrap();
        assert_eq!(validate_identity_number_on("11010519491231002X", today), Ok(()));
        assert_eq!(validate_identity_number_on("440524188001010014", today), Ok(()));
        assert_eq!(
            validate_identity_number_on("110101199003077777", today),
            Err(IdError::Check { found: '7', expected: '4' })
        );
        assert_eq!(validate_identity_number_on("110105194902300020", today), Err(IdError::BadDate("19490230".into())));
        assert_eq!(validate_identity_number_on("110105209912310029", today), Err(IdError::FutureDate("20991231".into())));
        assert!(matches!(validate_identity_number_on("11010519491231002x", today), Err(IdError::Character { pos: 18, .. })));
    }

    #[test]
    fn masks_keep_first_six_and_last_four() {
        assert_eq!(mask_identity_number("11010519491231002X"), "110105********002X");
    }
}
