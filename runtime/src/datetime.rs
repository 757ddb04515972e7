//! `DateTime<Utc>` fields of generated message types, (de)serialized as
//! chrono does, faster.
//!
//! chrono writes a date through `fmt::Write` a character at a time and
//! parses it with its general format machinery; a Taskcluster message holds
//! up to a dozen dates, which made them a large part of a message's
//! encoding and decoding. Generated types use these functions through
//! `#[serde(with = "::exchange_runtime::datetime")]` (and [`option`] for
//! optional fields). The text written is byte for byte chrono's
//! (`DateTime<Utc>`'s `Serialize`: RFC 3339, `Z`, the fraction only when not
//! zero, as milli-, micro- or nanoseconds); the canonical form
//! `YYYY-MM-DDTHH:MM:SS[.fraction]Z` is parsed directly, and anything else —
//! other offsets, lowercase separators, leap seconds, invalid dates, years
//! beyond 9999 — goes to chrono's own parser, so the values accepted and
//! the errors reported are chrono's.

use std::fmt;

use chrono::{DateTime, Datelike, FixedOffset, NaiveDate, NaiveTime, Timelike, Utc};
use serde::{Deserializer, Serializer, de};

/// Serializes as chrono's `Serialize` for `DateTime<Utc>` does.
pub fn serialize<S: Serializer>(value: &DateTime<Utc>, serializer: S) -> Result<S::Ok, S::Error> {
    let mut text = [0u8; 30];
    match write_canonical(value, &mut text) {
        // Only ASCII digits and separators were written.
        Some(len) => {
            serializer.serialize_str(std::str::from_utf8(&text[..len]).unwrap_or_default())
        }
        None => serde::Serialize::serialize(value, serializer),
    }
}

/// Deserializes as chrono's `Deserialize` for `DateTime<Utc>` does.
pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<DateTime<Utc>, D::Error> {
    deserializer.deserialize_str(Visitor)
}

/// The same for `Option<DateTime<Utc>>` fields (`null` or absent: `None`).
pub mod option {
    use super::*;

    /// Serializes `Some` as [`serialize`](super::serialize), `None` as `null`.
    pub fn serialize<S: Serializer>(
        value: &Option<DateTime<Utc>>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(value) => super::serialize(value, serializer),
            None => serializer.serialize_none(),
        }
    }

    /// Deserializes `null` as `None`, a string as [`deserialize`](super::deserialize).
    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<DateTime<Utc>>, D::Error> {
        deserializer.deserialize_option(OptionVisitor)
    }

    struct OptionVisitor;

    impl<'de> de::Visitor<'de> for OptionVisitor {
        type Value = Option<DateTime<Utc>>;

        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            formatter.write_str("an RFC 3339 formatted date and time string or null")
        }

        fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
            Ok(None)
        }

        fn visit_some<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            super::deserialize(deserializer).map(Some)
        }
    }
}

struct Visitor;

impl de::Visitor<'_> for Visitor {
    type Value = DateTime<Utc>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        // chrono's words, so errors read the same.
        formatter.write_str("an RFC 3339 formatted date and time string")
    }

    fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
        if let Some(parsed) = parse_canonical(value.as_bytes()) {
            return Ok(parsed);
        }
        value
            .parse::<DateTime<FixedOffset>>()
            .map(|parsed| parsed.with_timezone(&Utc))
            .map_err(E::custom)
    }
}

/// Writes `value` as chrono would into `out`; `None` for what chrono
/// writes otherwise (years outside 0–9999, leap seconds).
fn write_canonical(value: &DateTime<Utc>, out: &mut [u8; 30]) -> Option<usize> {
    let year = value.year();
    let nano = value.nanosecond();
    if !(0..=9999).contains(&year) || nano >= 1_000_000_000 {
        return None;
    }
    let two = |out: &mut [u8; 30], at: usize, n: u32| {
        out[at] = b'0' + (n / 10) as u8;
        out[at + 1] = b'0' + (n % 10) as u8;
    };
    let year = year as u32;
    two(out, 0, year / 100);
    two(out, 2, year % 100);
    out[4] = b'-';
    two(out, 5, value.month());
    out[7] = b'-';
    two(out, 8, value.day());
    out[10] = b'T';
    two(out, 11, value.hour());
    out[13] = b':';
    two(out, 14, value.minute());
    out[16] = b':';
    two(out, 17, value.second());
    let mut len = 19;
    let (digits, fraction) = if nano == 0 {
        (0, 0)
    } else if nano.is_multiple_of(1_000_000) {
        (3, nano / 1_000_000)
    } else if nano.is_multiple_of(1_000) {
        (6, nano / 1_000)
    } else {
        (9, nano)
    };
    if digits > 0 {
        out[len] = b'.';
        let mut rest = fraction;
        for at in (len + 1..=len + digits).rev() {
            out[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
        }
        len += 1 + digits;
    }
    out[len] = b'Z';
    Some(len + 1)
}

/// Parses `YYYY-MM-DDTHH:MM:SS[.1–9 digits]Z`; `None` for anything else
/// (chrono decides those), a leap second or a date or time that does not exist.
fn parse_canonical(text: &[u8]) -> Option<DateTime<Utc>> {
    if text.len() < 20 || text[text.len() - 1] != b'Z' {
        return None;
    }
    let digits = |range: std::ops::Range<usize>| -> Option<u32> {
        text.get(range)?.iter().try_fold(0u32, |n, &byte| {
            byte.is_ascii_digit()
                .then(|| n * 10 + u32::from(byte - b'0'))
        })
    };
    let separators = [(4, b'-'), (7, b'-'), (10, b'T'), (13, b':'), (16, b':')];
    if separators.iter().any(|&(at, byte)| text[at] != byte) {
        return None;
    }
    let year = i32::try_from(digits(0..4)?).ok()?;
    let date = NaiveDate::from_ymd_opt(year, digits(5..7)?, digits(8..10)?)?;
    let (hour, minute, second) = (digits(11..13)?, digits(14..16)?, digits(17..19)?);
    let nano = match &text[19..text.len() - 1] {
        [] => 0,
        [b'.', fraction @ ..] if (1..=9).contains(&fraction.len()) => {
            let value = digits(20..20 + fraction.len())?;
            value * 10u32.pow(9 - fraction.len() as u32)
        }
        _ => return None,
    };
    if second > 59 {
        return None; // A leap second: chrono's rules.
    }
    let time = NaiveTime::from_hms_nano_opt(hour, minute, second, nano)?;
    Some(date.and_time(time).and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Ours {
        #[serde(with = "super")]
        at: DateTime<Utc>,
        #[serde(default, with = "option", skip_serializing_if = "Option::is_none")]
        maybe: Option<DateTime<Utc>>,
    }

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Chronos {
        at: DateTime<Utc>,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        maybe: Option<DateTime<Utc>>,
    }

    fn instants() -> Vec<DateTime<Utc>> {
        let mut all = Vec::new();
        let base = Utc.with_ymd_and_hms(2026, 11, 27, 9, 5, 7).unwrap();
        for nano in [
            0,
            1,
            999,
            1_000,
            120_000,
            5_000_000,
            123_000_000,
            123_456_000,
            123_456_789,
            999_999_999,
        ] {
            all.push(base + chrono::Duration::nanoseconds(nano));
        }
        for (y, m, d, h, mi, s) in [
            (0, 1, 1, 0, 0, 0),
            (9999, 12, 31, 23, 59, 59),
            (2024, 2, 29, 12, 0, 0),
            (1970, 1, 1, 0, 0, 0),
        ] {
            all.push(Utc.with_ymd_and_hms(y, m, d, h, mi, s).unwrap());
        }
        // Written by chrono itself: beyond 9999, before year 0, a leap second.
        all.push(Utc.with_ymd_and_hms(10_000, 1, 1, 0, 0, 0).unwrap());
        all.push(Utc.with_ymd_and_hms(-1, 6, 1, 0, 0, 0).unwrap());
        let leap = NaiveDate::from_ymd_opt(2016, 12, 31)
            .unwrap()
            .and_hms_nano_opt(23, 59, 59, 1_500_000_000)
            .unwrap()
            .and_utc();
        all.push(leap);
        all
    }

    /// The common forms take the fast paths (the rest is chrono's anyway).
    #[test]
    fn canonical_forms_take_the_fast_paths() {
        for text in [
            "2026-11-27T09:05:07Z",
            "2026-11-27T09:05:07.123Z",
            "0000-01-01T00:00:00.000000001Z",
        ] {
            let parsed = parse_canonical(text.as_bytes()).expect(text);
            let mut out = [0; 30];
            let len = write_canonical(&parsed, &mut out).expect(text);
            assert_eq!(&out[..len], text.as_bytes());
        }
        for text in [
            "2026-11-27T09:05:07+00:00",
            "2016-12-31T23:59:60Z",
            "2026-02-29T00:00:00Z",
        ] {
            assert!(parse_canonical(text.as_bytes()).is_none(), "{text}");
        }
    }

    #[test]
    fn written_exactly_as_chrono_writes() {
        for at in instants() {
            for maybe in [None, Some(at)] {
                let ours = serde_json::to_string(&Ours { at, maybe }).unwrap();
                let chronos = serde_json::to_string(&Chronos { at, maybe }).unwrap();
                assert_eq!(ours, chronos);
                let back: Ours = serde_json::from_str(&ours).unwrap();
                assert_eq!(back, Ours { at, maybe });
            }
        }
    }

    #[test]
    fn read_as_chrono_reads_errors_included() {
        let texts = [
            "2026-11-27T09:05:07Z",
            "2026-11-27T09:05:07.5Z",
            "2026-11-27T09:05:07.123Z",
            "2026-11-27T09:05:07.123456789Z",
            "2026-11-27T09:05:07.1234567891Z",
            "2026-11-27t09:05:07z",
            "2026-11-27 09:05:07Z",
            "2026-11-27T09:05:07+02:00",
            "2026-11-27T09:05:07-00:30",
            "2016-12-31T23:59:60Z",
            "2016-12-31T23:59:60.5Z",
            "2026-02-29T00:00:00Z",
            "2026-13-01T00:00:00Z",
            "2026-11-27T24:00:00Z",
            "2026-11-27T09:05:07.Z",
            "2026-11-27T09:05:07",
            "+10000-01-01T00:00:00Z",
            "2026-11-27T09:05:07Z trailing",
            "2026-1x-27T09:05:07Z",
            "",
            "not a date",
        ];
        for text in texts {
            let ours: Result<Ours, _> =
                serde_json::from_value(serde_json::json!({ "at": text, "maybe": text }));
            let chronos: Result<Chronos, _> =
                serde_json::from_value(serde_json::json!({ "at": text, "maybe": text }));
            match (ours, chronos) {
                (Ok(ours), Ok(chronos)) => {
                    assert_eq!((ours.at, ours.maybe), (chronos.at, chronos.maybe), "{text}");
                }
                (Err(ours), Err(chronos)) => {
                    assert_eq!(ours.to_string(), chronos.to_string(), "{text}")
                }
                (ours, chronos) => panic!("{text}: ours {ours:?}, chrono's {chronos:?}"),
            }
        }
        // Not a string at all, and null for the optional field.
        let wrong: Result<Ours, _> = serde_json::from_value(serde_json::json!({ "at": 5 }));
        let chronos: Result<Chronos, _> = serde_json::from_value(serde_json::json!({ "at": 5 }));
        assert_eq!(
            wrong.unwrap_err().to_string(),
            chronos.unwrap_err().to_string()
        );
        let null: Ours = serde_json::from_value(
            serde_json::json!({ "at": "2026-11-27T09:05:07Z", "maybe": null }),
        )
        .unwrap();
        assert_eq!(null.maybe, None);
    }
}
