//! A lenient AMQP 0-9-1 frame codec: every short string is kept as bytes.
//!
//! lapin's parser (amq-protocol) decodes short strings as strict UTF-8 and
//! drops the whole connection on a message whose routing key, property or
//! header name is not valid UTF-8 — which RabbitMQ accepts from any publisher.
//! This codec, which every connection of this module reads and writes with,
//! reads such messages without judging them, so that they can be set aside
//! (see [`raw`](super::raw)).

use std::fmt;

/// Frame types.
pub(crate) const FRAME_METHOD: u8 = 1;
pub(crate) const FRAME_HEADER: u8 = 2;
pub(crate) const FRAME_BODY: u8 = 3;
pub(crate) const FRAME_HEARTBEAT: u8 = 8;
const FRAME_END: u8 = 0xCE;

/// The basic class's id: content headers name it.
pub(crate) const CLASS_BASIC: u16 = 60;

/// Malformed or unexpected input on the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireError(pub(crate) String);

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for WireError {}

fn truncated(what: &str) -> WireError {
    WireError(format!("truncated {what}"))
}

/// One frame: its type, channel and payload (frame end checked and removed).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Frame {
    pub(crate) kind: u8,
    pub(crate) channel: u16,
    pub(crate) payload: Vec<u8>,
}

impl Frame {
    /// Splits a frame off the front of `buffer`: `Ok(None)` while incomplete.
    pub(crate) fn parse(
        buffer: &[u8],
        frame_max: u32,
    ) -> Result<Option<(Frame, usize)>, WireError> {
        Ok(FrameRef::parse(buffer, frame_max)?.map(|(frame, used)| {
            (
                Frame {
                    kind: frame.kind,
                    channel: frame.channel,
                    payload: frame.payload.to_vec(),
                },
                used,
            )
        }))
    }

    /// The frame's bytes on the wire.
    pub(crate) fn encode(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(payload.len() + 8);
        encode_frame_into(&mut bytes, kind, channel, payload);
        bytes
    }

    /// A method frame's class and method ids, and its arguments.
    pub(crate) fn method(&self) -> Result<(u16, u16, Reader<'_>), WireError> {
        let mut reader = Reader::new(&self.payload);
        let class = reader.u16("method class")?;
        let method = reader.u16("method id")?;
        Ok((class, method, reader))
    }
}

/// A frame borrowed from the read buffer (nothing copied until needed).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct FrameRef<'a> {
    pub(crate) kind: u8,
    pub(crate) channel: u16,
    pub(crate) payload: &'a [u8],
}

impl<'a> FrameRef<'a> {
    /// Splits a frame off the front of `buffer`: `Ok(None)` while incomplete.
    pub(crate) fn parse(
        buffer: &'a [u8],
        frame_max: u32,
    ) -> Result<Option<(FrameRef<'a>, usize)>, WireError> {
        if buffer.len() < 7 {
            return Ok(None);
        }
        let kind = buffer[0];
        let channel = u16::from_be_bytes([buffer[1], buffer[2]]);
        let size = u32::from_be_bytes([buffer[3], buffer[4], buffer[5], buffer[6]]);
        if frame_max > 0 && size > frame_max {
            return Err(WireError(format!(
                "frame of {size} bytes exceeds the negotiated maximum {frame_max}"
            )));
        }
        let size = size as usize;
        let Some(&end) = buffer.get(7 + size) else {
            return Ok(None);
        };
        if end != FRAME_END {
            return Err(WireError(format!("frame end byte is {end:#04x}, not 0xCE")));
        }
        let frame = FrameRef {
            kind,
            channel,
            payload: &buffer[7..7 + size],
        };
        Ok(Some((frame, 8 + size)))
    }

    /// A method frame's class and method ids, and its arguments.
    pub(crate) fn method(&self) -> Result<(u16, u16, Reader<'a>), WireError> {
        let mut reader = Reader::new(self.payload);
        let class = reader.u16("method class")?;
        let method = reader.u16("method id")?;
        Ok((class, method, reader))
    }
}

/// Appends one frame's bytes to `out`.
pub(crate) fn encode_frame_into(out: &mut Vec<u8>, kind: u8, channel: u16, payload: &[u8]) {
    out.reserve(payload.len() + 8);
    out.push(kind);
    out.extend_from_slice(&channel.to_be_bytes());
    // Payloads are built here, never over a frame's size limit (u32).
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(payload);
    out.push(FRAME_END);
}

/// An AMQP short string (names, routing keys): UTF-8, at most 255 bytes.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct ShortString(Box<str>);

impl ShortString {
    /// `value`, if it fits in a short string.
    pub(crate) fn try_new(value: impl Into<String>) -> Result<Self, String> {
        let value = value.into();
        if value.len() > 255 {
            return Err(value);
        }
        Ok(ShortString(value.into_boxed_str()))
    }

    pub(crate) fn as_str(&self) -> &str {
        &self.0
    }
}

/// Reads AMQP fields from a payload.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes }
    }

    fn take(&mut self, count: usize, what: &str) -> Result<&'a [u8], WireError> {
        if self.bytes.len() < count {
            return Err(truncated(what));
        }
        let (head, tail) = self.bytes.split_at(count);
        self.bytes = tail;
        Ok(head)
    }

    pub(crate) fn u8(&mut self, what: &str) -> Result<u8, WireError> {
        Ok(self.take(1, what)?[0])
    }

    pub(crate) fn u16(&mut self, what: &str) -> Result<u16, WireError> {
        let bytes = self.take(2, what)?;
        Ok(u16::from_be_bytes([bytes[0], bytes[1]]))
    }

    pub(crate) fn u32(&mut self, what: &str) -> Result<u32, WireError> {
        let bytes = self.take(4, what)?;
        Ok(u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    pub(crate) fn u64(&mut self, what: &str) -> Result<u64, WireError> {
        let mut word = [0; 8];
        word.copy_from_slice(self.take(8, what)?);
        Ok(u64::from_be_bytes(word))
    }

    /// A short string, as bytes.
    pub(crate) fn short(&mut self, what: &str) -> Result<&'a [u8], WireError> {
        let len = self.u8(what)?;
        self.take(usize::from(len), what)
    }

    /// A long string, as bytes.
    pub(crate) fn long(&mut self, what: &str) -> Result<&'a [u8], WireError> {
        let len = self.u32(what)? as usize;
        self.take(len, what)
    }

    /// What is left.
    pub(crate) fn rest(&self) -> &'a [u8] {
        self.bytes
    }
}

/// Writes AMQP fields into a payload.
#[derive(Default, Clone)]
pub(crate) struct Writer(pub(crate) Vec<u8>);

impl Writer {
    /// A method payload: class and method ids, then the arguments.
    pub(crate) fn method(class: u16, method: u16) -> Self {
        let mut writer = Writer::default();
        writer.u16(class).u16(method);
        writer
    }

    pub(crate) fn u8(&mut self, value: u8) -> &mut Self {
        self.0.push(value);
        self
    }

    pub(crate) fn u16(&mut self, value: u16) -> &mut Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn u32(&mut self, value: u32) -> &mut Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    pub(crate) fn u64(&mut self, value: u64) -> &mut Self {
        self.0.extend_from_slice(&value.to_be_bytes());
        self
    }

    /// A short string; fails over 255 bytes.
    pub(crate) fn short(&mut self, what: &str, value: &[u8]) -> Result<&mut Self, WireError> {
        let len = u8::try_from(value.len()).map_err(|_| {
            WireError(format!(
                "{what} is {} bytes long; AMQP allows at most 255",
                value.len()
            ))
        })?;
        self.0.push(len);
        self.0.extend_from_slice(value);
        Ok(self)
    }

    /// A long string.
    pub(crate) fn long(&mut self, value: &[u8]) -> &mut Self {
        // Values written here come from frames or small tables: far below 4 GiB.
        self.u32(value.len() as u32);
        self.0.extend_from_slice(value);
        self
    }
}

/// The basic class's properties, in flag order (bit 15 first). Short strings
/// are kept as bytes.
pub(crate) const PROPERTY_NAMES: [(&str, PropertyKind); 14] = [
    ("content-type", PropertyKind::Short),
    ("content-encoding", PropertyKind::Short),
    ("headers", PropertyKind::Table),
    ("delivery-mode", PropertyKind::Octet),
    ("priority", PropertyKind::Octet),
    ("correlation-id", PropertyKind::Short),
    ("reply-to", PropertyKind::Short),
    ("expiration", PropertyKind::Short),
    ("message-id", PropertyKind::Short),
    ("timestamp", PropertyKind::Timestamp),
    ("type", PropertyKind::Short),
    ("user-id", PropertyKind::Short),
    ("app-id", PropertyKind::Short),
    ("cluster-id", PropertyKind::Short),
];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum PropertyKind {
    Short,
    Table,
    Octet,
    Timestamp,
}

/// One property value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PropertyValue {
    /// A short string, as bytes.
    Short(Vec<u8>),
    /// The headers table.
    Table(Table),
    /// delivery-mode, priority.
    Octet(u8),
    /// timestamp.
    Timestamp(u64),
}

/// A field table, keys as bytes, values kept raw (type tag and encoding).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Table(pub(crate) Vec<(Vec<u8>, FieldValue)>);

/// A table value; nested tables and arrays are parsed (their keys may be invalid too).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum FieldValue {
    /// A nested table (`F`).
    Table(Table),
    /// An array (`A`).
    Array(Vec<FieldValue>),
    /// Any other value: its type tag and encoded bytes.
    Scalar(u8, Vec<u8>),
}

/// A content header: the body's size and the message's properties, by name.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct ContentHeader {
    pub(crate) body_size: u64,
    /// `(name, value)` in flag order.
    pub(crate) properties: Vec<(&'static str, PropertyValue)>,
}

impl ContentHeader {
    /// Parses a content header frame's payload.
    pub(crate) fn parse(payload: &[u8]) -> Result<Self, WireError> {
        let mut reader = Reader::new(payload);
        let class = reader.u16("content header class")?;
        if class != CLASS_BASIC {
            return Err(WireError(format!(
                "content header of class {class}, not basic"
            )));
        }
        reader.u16("content header weight")?;
        let body_size = reader.u64("content body size")?;
        let flags = reader.u16("property flags")?;
        if flags & 1 != 0 {
            return Err(WireError("property flags continue past 16 bits".into()));
        }
        let mut properties = Vec::new();
        for (index, (name, kind)) in PROPERTY_NAMES.iter().enumerate() {
            if flags & (1 << (15 - index)) == 0 {
                continue;
            }
            let value = match kind {
                PropertyKind::Short => PropertyValue::Short(reader.short(name)?.to_vec()),
                PropertyKind::Table => {
                    PropertyValue::Table(Table::parse(reader.long("headers table")?, 0)?)
                }
                PropertyKind::Octet => PropertyValue::Octet(reader.u8(name)?),
                PropertyKind::Timestamp => PropertyValue::Timestamp(reader.u64(name)?),
            };
            properties.push((*name, value));
        }
        Ok(ContentHeader {
            body_size,
            properties,
        })
    }

    /// The content header frame's payload.
    pub(crate) fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut writer = Writer::default();
        writer.u16(CLASS_BASIC).u16(0).u64(self.body_size);
        let mut flags = 0u16;
        let mut values = Writer::default();
        for (index, (name, _)) in PROPERTY_NAMES.iter().enumerate() {
            let Some((_, value)) = self.properties.iter().find(|(n, _)| n == name) else {
                continue;
            };
            flags |= 1 << (15 - index);
            match value {
                PropertyValue::Short(bytes) => {
                    values.short(name, bytes)?;
                }
                PropertyValue::Table(table) => {
                    values.long(&table.encode()?);
                }
                PropertyValue::Octet(octet) => {
                    values.u8(*octet);
                }
                PropertyValue::Timestamp(stamp) => {
                    values.u64(*stamp);
                }
            }
        }
        writer.u16(flags);
        writer.0.extend_from_slice(&values.0);
        Ok(writer.0)
    }

    /// A property's value.
    pub(crate) fn get(&self, name: &str) -> Option<&PropertyValue> {
        self.properties
            .iter()
            .find_map(|(n, value)| (*n == name).then_some(value))
    }

    /// Sets (or replaces) a property; `None` removes it.
    pub(crate) fn set(&mut self, name: &'static str, value: Option<PropertyValue>) {
        self.properties.retain(|(n, _)| *n != name);
        if let Some(value) = value {
            self.properties.push((name, value));
        }
    }
}

/// Tables nest; a hostile message must not overflow the stack.
const MAX_TABLE_DEPTH: usize = 32;

impl Table {
    fn parse(bytes: &[u8], depth: usize) -> Result<Self, WireError> {
        if depth > MAX_TABLE_DEPTH {
            return Err(WireError(format!(
                "tables nested over {MAX_TABLE_DEPTH} deep"
            )));
        }
        let mut reader = Reader::new(bytes);
        let mut fields = Vec::new();
        while !reader.rest().is_empty() {
            let name = reader.short("table field name")?.to_vec();
            let value = FieldValue::parse(&mut reader, depth)?;
            fields.push((name, value));
        }
        Ok(Table(fields))
    }

    pub(crate) fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut writer = Writer::default();
        for (name, value) in &self.0 {
            writer.short("table field name", name)?;
            value.encode(&mut writer)?;
        }
        Ok(writer.0)
    }
}

impl FieldValue {
    pub(crate) fn parse(reader: &mut Reader<'_>, depth: usize) -> Result<Self, WireError> {
        let tag = reader.u8("field type")?;
        // Sizes follow RabbitMQ's field types (`s` is a 16-bit integer there).
        let size = match tag {
            b'F' => {
                return Ok(FieldValue::Table(Table::parse(
                    reader.long("table")?,
                    depth + 1,
                )?));
            }
            b'A' => {
                let mut items = Reader::new(reader.long("array")?);
                let mut values = Vec::new();
                while !items.rest().is_empty() {
                    values.push(FieldValue::parse(&mut items, depth + 1)?);
                }
                return Ok(FieldValue::Array(values));
            }
            b'S' | b'x' => {
                let bytes = reader.long("long string")?;
                let mut raw = Vec::with_capacity(bytes.len() + 4);
                raw.extend_from_slice(&(bytes.len() as u32).to_be_bytes());
                raw.extend_from_slice(bytes);
                return Ok(FieldValue::Scalar(tag, raw));
            }
            b't' | b'b' | b'B' => 1,
            b's' | b'u' | b'U' => 2,
            b'I' | b'i' | b'f' => 4,
            b'l' | b'L' | b'd' | b'T' => 8,
            b'D' => 5,
            b'V' => 0,
            other => {
                return Err(WireError(format!("unknown field type {other:#04x}")));
            }
        };
        Ok(FieldValue::Scalar(
            tag,
            reader.take(size, "field value")?.to_vec(),
        ))
    }

    fn encode(&self, writer: &mut Writer) -> Result<(), WireError> {
        match self {
            FieldValue::Table(table) => {
                writer.u8(b'F').long(&table.encode()?);
            }
            FieldValue::Array(values) => {
                let mut items = Writer::default();
                for value in values {
                    value.encode(&mut items)?;
                }
                writer.u8(b'A').long(&items.0);
            }
            FieldValue::Scalar(tag, raw) => {
                writer.u8(*tag);
                writer.0.extend_from_slice(raw);
            }
        }
        Ok(())
    }
}

/// A short string that is not valid UTF-8, found where lapin would fail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InvalidField {
    /// Which field: `routing key`, `exchange`, a property name
    /// (`message-id`, ...) or `header name`.
    pub field: String,
    /// Its bytes as received.
    pub bytes: Vec<u8>,
}

impl fmt::Display for InvalidField {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} is not valid UTF-8 (bytes", self.field)?;
        for byte in &self.bytes {
            write!(f, " {byte:02x}")?;
        }
        f.write_str(")")
    }
}

/// `bytes` as UTF-8, invalid sequences replaced (U+FFFD); records the field when it was invalid.
pub(crate) fn sanitize(field: &str, bytes: &[u8], invalid: &mut Vec<InvalidField>) -> Vec<u8> {
    match std::str::from_utf8(bytes) {
        Ok(_) => bytes.to_vec(),
        Err(_) => {
            invalid.push(InvalidField {
                field: field.to_owned(),
                bytes: bytes.to_vec(),
            });
            // Replacement characters can lengthen it: keep within a short string's 255 bytes.
            let text = String::from_utf8_lossy(bytes);
            let mut end = text.len().min(255);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            text[..end].as_bytes().to_vec()
        }
    }
}

impl ContentHeader {
    /// Replaces every short string that is not valid UTF-8 (properties,
    /// header names at any depth) and returns what was replaced.
    pub(crate) fn sanitize(&mut self) -> Vec<InvalidField> {
        let mut invalid = Vec::new();
        for (name, value) in &mut self.properties {
            match value {
                PropertyValue::Short(bytes) => *bytes = sanitize(name, bytes, &mut invalid),
                PropertyValue::Table(table) => table.sanitize(&mut invalid),
                PropertyValue::Octet(_) | PropertyValue::Timestamp(_) => {}
            }
        }
        invalid
    }
}

impl Table {
    fn sanitize(&mut self, invalid: &mut Vec<InvalidField>) {
        for (name, value) in &mut self.0 {
            *name = sanitize("header name", name, invalid);
            value.sanitize(invalid);
        }
    }
}

impl FieldValue {
    pub(crate) fn sanitize(&mut self, invalid: &mut Vec<InvalidField>) {
        match self {
            FieldValue::Table(table) => table.sanitize(invalid),
            FieldValue::Array(values) => values.iter_mut().for_each(|v| v.sanitize(invalid)),
            FieldValue::Scalar(..) => {}
        }
    }

    /// A long-string (`S`) value.
    pub(crate) fn long_string(value: &[u8]) -> Self {
        let mut raw = Vec::with_capacity(value.len() + 4);
        raw.extend_from_slice(&(value.len() as u32).to_be_bytes());
        raw.extend_from_slice(value);
        FieldValue::Scalar(b'S', raw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header_with(properties: Vec<(&'static str, PropertyValue)>) -> ContentHeader {
        ContentHeader {
            body_size: 3,
            properties,
        }
    }

    #[test]
    fn content_header_round_trips_with_every_kind_of_property() {
        let header = header_with(vec![
            (
                "content-type",
                PropertyValue::Short(b"application/json".to_vec()),
            ),
            (
                "headers",
                PropertyValue::Table(Table(vec![
                    (b"a".to_vec(), FieldValue::long_string(b"b")),
                    (
                        b"nested".to_vec(),
                        FieldValue::Table(Table(vec![(
                            b"n".to_vec(),
                            FieldValue::Scalar(b's', vec![0, 7]),
                        )])),
                    ),
                    (
                        b"list".to_vec(),
                        FieldValue::Array(vec![FieldValue::Scalar(b'V', vec![])]),
                    ),
                ])),
            ),
            ("delivery-mode", PropertyValue::Octet(2)),
            ("message-id", PropertyValue::Short(vec![0xff, 0xfe])),
            ("timestamp", PropertyValue::Timestamp(1_700_000_000)),
        ]);
        let encoded = header.encode().unwrap();
        assert_eq!(ContentHeader::parse(&encoded).unwrap(), header);
    }

    #[test]
    fn sanitize_names_each_invalid_field_and_leaves_valid_ones() {
        let mut header = header_with(vec![
            ("content-type", PropertyValue::Short(b"text/plain".to_vec())),
            (
                "headers",
                PropertyValue::Table(Table(vec![(
                    vec![0xc3, 0x28],
                    FieldValue::long_string(&[0xff]),
                )])),
            ),
            (
                "message-id",
                PropertyValue::Short(vec![0xff, 0xfe, 0xc3, 0x28]),
            ),
        ]);
        let invalid = header.sanitize();
        let fields: Vec<_> = invalid.iter().map(|f| f.field.as_str()).collect();
        assert_eq!(fields, ["header name", "message-id"]);
        assert_eq!(
            invalid[1].to_string(),
            "message-id is not valid UTF-8 (bytes ff fe c3 28)"
        );
        assert_eq!(
            header.get("message-id"),
            Some(&PropertyValue::Short(
                "\u{fffd}\u{fffd}\u{fffd}(".as_bytes().to_vec()
            ))
        );
        assert_eq!(
            header.get("content-type"),
            Some(&PropertyValue::Short(b"text/plain".to_vec()))
        );
        // Long-string values are bytes to every client: left as they are.
        let PropertyValue::Table(table) = header.get("headers").unwrap() else {
            panic!("headers is a table");
        };
        assert_eq!(table.0[0].1, FieldValue::long_string(&[0xff]));
        // The sanitized header parses as strict UTF-8 everywhere lapin looks.
        assert!(header.sanitize().is_empty());
    }

    #[test]
    fn sanitize_keeps_a_short_string_within_255_bytes() {
        let mut invalid = Vec::new();
        let cleaned = sanitize("routing key", &[0xff; 255], &mut invalid);
        assert!(cleaned.len() <= 255);
        assert!(std::str::from_utf8(&cleaned).is_ok());
        assert_eq!(invalid.len(), 1);
    }

    #[test]
    fn hostile_headers_are_errors_not_panics() {
        // Truncated inputs at every length.
        let header = header_with(vec![
            ("content-type", PropertyValue::Short(b"x".to_vec())),
            (
                "headers",
                PropertyValue::Table(Table(vec![(b"k".to_vec(), FieldValue::long_string(b"v"))])),
            ),
        ])
        .encode()
        .unwrap();
        for len in 0..header.len() {
            assert!(
                ContentHeader::parse(&header[..len]).is_err(),
                "prefix {len}"
            );
        }
        // Nesting past the limit.
        let mut table = Vec::new();
        for _ in 0..100 {
            let mut outer = vec![1, b'n', b'F'];
            outer.extend_from_slice(&(table.len() as u32).to_be_bytes());
            outer.extend_from_slice(&table);
            table = outer;
        }
        let error = Table::parse(&table, 0).unwrap_err();
        assert!(error.0.contains("nested"), "{error}");
        // Unknown field types.
        assert!(Table::parse(&[1, b'k', b'?'], 0).is_err());
    }

    #[test]
    fn frames_split_and_check_their_end() {
        let bytes = Frame::encode(FRAME_METHOD, 3, &[1, 2, 3]);
        let (frame, used) = Frame::parse(&bytes, 0).unwrap().unwrap();
        assert_eq!(
            (frame.kind, frame.channel, frame.payload, used),
            (1, 3, vec![1, 2, 3], 11)
        );
        assert_eq!(Frame::parse(&bytes[..10], 0).unwrap(), None);
        let mut bad = bytes.clone();
        bad[10] = 0;
        assert!(Frame::parse(&bad, 0).is_err());
        assert!(Frame::parse(&bytes, 2).is_err());
    }
}
