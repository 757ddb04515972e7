//! A message serialized once into its JSON text, with an index of the
//! values in it ([`Document`]) that the schema validator reads in place.
//!
//! `serde_json` writes the text through a [`Formatter`] of ours that writes
//! exactly what its compact formatter writes and records, for every value,
//! where it is in the text (strings), what it is (numbers, booleans, null)
//! and how far it reaches (arrays, objects). The validator then checks that
//! index, so the bytes published are the bytes validated, with no
//! `serde_json::Value` tree built, walked or freed in between.
//!
//! What the index does not hold exactly (an `f32`, a number beyond 64 bits,
//! a raw JSON fragment, an object with a key written twice) makes
//! [`Document::serialize`] return `None`; the caller then takes the
//! `serde_json::Value` path.

use std::borrow::Cow;
use std::cell::Cell;
use std::io;

use jsonschema::JsonType;
use jsonschema::json::{Array, Json, JsonNumber, Node, NodeIdentity, Object};
use serde::Serialize;
use serde_json::ser::{CharEscape, CompactFormatter, Formatter};
use serde_json::{Map, Number, Value};

/// One value of a [`Document`], in the order the text has them.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Entry {
    Null,
    Bool(bool),
    U64(u64),
    I64(i64),
    F64(f64),
    /// The text between the quotes is `text[start..end]`, JSON-escaped
    /// (`escaped`: it holds an escape sequence).
    Str {
        start: usize,
        end: usize,
        escaped: bool,
    },
    /// `len` elements follow; `end` is the index after its last descendant.
    Array {
        len: usize,
        end: usize,
    },
    /// `len` members follow, each its name (a `Str`) and then its value;
    /// `end` is the index after its last descendant.
    Object {
        len: usize,
        end: usize,
    },
}

thread_local! {
    /// The index of the last document serialized on this thread, for the next.
    static ENTRIES: Cell<Vec<Entry>> = const { Cell::new(Vec::new()) };
    /// The open-container stack of the last serialization on this thread.
    static OPEN: Cell<Vec<usize>> = const { Cell::new(Vec::new()) };
}

/// Keeps `buffer` in `slot` for the next serialization on this thread,
/// unless it grew too large to keep.
fn keep<T>(slot: &'static std::thread::LocalKey<Cell<Vec<T>>>, buffer: Vec<T>) {
    if buffer.capacity() <= 1 << 16 {
        slot.set(buffer);
    }
}

/// A serialized message: its JSON text and the index of its values.
#[derive(Debug)]
pub(crate) struct Document {
    text: String,
    entries: Vec<Entry>,
}

impl Document {
    /// Serializes `value` into a text of at least `capacity` bytes;
    /// `Ok(None)` when the index cannot hold it exactly (see the module docs).
    pub(crate) fn serialize<T: Serialize + ?Sized>(
        value: &T,
        capacity: usize,
    ) -> Result<Option<Document>, serde_json::Error> {
        // The index buffers of this thread's last serialization: no
        // allocation, growth or page fault per message once warm.
        let mut entries = ENTRIES.take();
        entries.clear();
        entries.reserve(capacity / 8);
        let mut open = OPEN.take();
        open.clear();
        let mut recorder = Recorder {
            position: 0,
            entries,
            open,
            key_start: None,
            string_start: 0,
            escaped: false,
            exact: true,
        };
        let mut bytes = Vec::with_capacity(capacity);
        let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, &mut recorder);
        let serialized = value.serialize(&mut serializer);
        let closed = recorder.open.is_empty();
        keep(&OPEN, std::mem::take(&mut recorder.open));
        serialized?;
        if !recorder.exact || recorder.entries.is_empty() || !closed {
            keep(&ENTRIES, recorder.entries);
            return Ok(None);
        }
        // serde_json writes UTF-8 only; the check is a cheap guard, never an expected failure.
        let Ok(text) = String::from_utf8(bytes) else {
            return Ok(None);
        };
        let document = Document {
            text,
            entries: recorder.entries,
        };
        Ok((!document.has_repeated_key()).then_some(document))
    }

    /// The root value.
    pub(crate) fn root(&self) -> TapeNode<'_> {
        TapeNode {
            document: self,
            index: 0,
        }
    }

    /// The JSON text (the index goes back to this thread's buffers).
    pub(crate) fn into_bytes(self) -> Vec<u8> {
        keep(&ENTRIES, self.entries);
        self.text.into_bytes()
    }

    /// The index after the value at `index` and its descendants.
    fn after(&self, index: usize) -> usize {
        match self.entries.get(index) {
            Some(Entry::Array { end, .. } | Entry::Object { end, .. }) => *end,
            _ => index + 1,
        }
    }

    /// The raw (still escaped) text of the string at `index`.
    fn raw(&self, index: usize) -> Option<(&str, bool)> {
        match self.entries.get(index) {
            Some(&Entry::Str {
                start,
                end,
                escaped,
            }) => Some((self.text.get(start..end)?, escaped)),
            _ => None,
        }
    }

    /// The string at `index`, unescaped.
    fn string(&self, index: usize) -> Option<Cow<'_, str>> {
        let Some(&Entry::Str {
            start,
            end,
            escaped,
        }) = self.entries.get(index)
        else {
            return None;
        };
        let raw = self.text.get(start..end)?;
        if !escaped {
            return Some(Cow::Borrowed(raw));
        }
        // Rare (a quote, backslash or control character): read the literal back.
        let literal = self.text.get(start.checked_sub(1)?..end + 1)?;
        Some(serde_json::from_str::<String>(literal).map_or(Cow::Borrowed(raw), Cow::Owned))
    }

    /// Whether an object names a member twice, which a reader of the text
    /// would resolve (the last one wins) but the index would not.
    fn has_repeated_key(&self) -> bool {
        // Names are compared as written: serde_json escapes a string one way
        // only. Up to 32 names on the stack; larger objects in a vector.
        let mut small = [""; 32];
        let mut large: Vec<&str> = Vec::new();
        self.entries.iter().enumerate().any(|(index, entry)| {
            let Entry::Object { len, end } = *entry else {
                return false;
            };
            if len < 2 {
                return false;
            }
            let mut count = 0;
            large.clear();
            let mut name = index + 1;
            while name + 1 < end {
                if let Some((raw, _)) = self.raw(name) {
                    if count < small.len() {
                        small[count] = raw;
                    } else {
                        if large.is_empty() {
                            large.extend_from_slice(&small);
                        }
                        large.push(raw);
                    }
                    count += 1;
                }
                name = self.after(name + 1);
            }
            let names = if count <= small.len() {
                &small[..count]
            } else {
                &large[..]
            };
            names
                .iter()
                .enumerate()
                .any(|(at, name)| names[at + 1..].contains(name))
        })
    }

    /// The value at `index` as a `serde_json::Value` (error reports only).
    fn value(&self, index: usize) -> Value {
        match self.entries.get(index) {
            None | Some(Entry::Null) => Value::Null,
            Some(&Entry::Bool(boolean)) => Value::Bool(boolean),
            Some(&Entry::U64(number)) => Value::from(number),
            Some(&Entry::I64(number)) => Value::from(number),
            Some(&Entry::F64(number)) => Value::from(number),
            Some(Entry::Str { .. }) => Value::String(self.string(index).unwrap_or_default().into()),
            Some(Entry::Array { .. }) => Value::Array(
                Elements::new(self, index)
                    .map(|element| self.value(element))
                    .collect(),
            ),
            Some(Entry::Object { .. }) => Value::Object(
                Members::new(self, index)
                    .map(|(name, value)| {
                        (
                            self.string(name).unwrap_or_default().into_owned(),
                            self.value(value),
                        )
                    })
                    .collect::<Map<String, Value>>(),
            ),
        }
    }
}

/// Indices of an array's elements.
struct Elements<'a> {
    document: &'a Document,
    next: usize,
    end: usize,
}

impl<'a> Elements<'a> {
    fn new(document: &'a Document, index: usize) -> Self {
        Elements {
            document,
            next: index + 1,
            end: document.after(index),
        }
    }
}

impl Iterator for Elements<'_> {
    type Item = usize;

    fn next(&mut self) -> Option<usize> {
        (self.next < self.end).then(|| {
            let element = self.next;
            self.next = self.document.after(element);
            element
        })
    }
}

/// Indices of an object's member names and values.
struct Members<'a> {
    document: &'a Document,
    next: usize,
    end: usize,
}

impl<'a> Members<'a> {
    fn new(document: &'a Document, index: usize) -> Self {
        Members {
            document,
            next: index + 1,
            end: document.after(index),
        }
    }
}

impl Iterator for Members<'_> {
    type Item = (usize, usize);

    fn next(&mut self) -> Option<(usize, usize)> {
        (self.next + 1 < self.end).then(|| {
            let name = self.next;
            self.next = self.document.after(name + 1);
            (name, name + 1)
        })
    }
}

/// Counts the bytes written through it.
struct Counted<'w, W: ?Sized> {
    inner: &'w mut W,
    count: usize,
}

impl<W: ?Sized + io::Write> io::Write for Counted<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let written = self.inner.write(buf)?;
        self.count += written;
        Ok(written)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.inner.write_all(buf)?;
        self.count += buf.len();
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Writes what [`CompactFormatter`] writes (the tests hold it to
/// `serde_json::to_vec`'s bytes), recording the [`Entry`]s.
struct Recorder {
    /// Bytes written so far.
    position: usize,
    entries: Vec<Entry>,
    /// The containers not yet closed, innermost last.
    open: Vec<usize>,
    /// Where the member name being written starts (at its opening quote).
    key_start: Option<usize>,
    /// Where the string being written starts (after its opening quote).
    string_start: usize,
    /// Whether the string being written has an escape sequence.
    escaped: bool,
    /// False once something was written that the index cannot hold exactly.
    exact: bool,
}

impl Recorder {
    fn write<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        write: impl FnOnce(&mut Counted<'_, W>) -> io::Result<()>,
    ) -> io::Result<()> {
        let mut counted = Counted {
            inner: writer,
            count: 0,
        };
        let result = write(&mut counted);
        self.position += counted.count;
        result
    }

    /// Writes what [`CompactFormatter`] writes between values (`[`, `,`,
    /// `:`, quotes), or a string's unescaped run.
    fn punctuation<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        bytes: &[u8],
    ) -> io::Result<()> {
        writer.write_all(bytes)?;
        self.position += bytes.len();
        Ok(())
    }

    /// Records a value (nothing inside a member name, which is recorded whole).
    fn value(&mut self, entry: Entry) {
        if self.key_start.is_some() {
            return;
        }
        if let Some(&parent) = self.open.last()
            && let Some(Entry::Array { len, .. } | Entry::Object { len, .. }) =
                self.entries.get_mut(parent)
        {
            *len += 1;
        }
        self.entries.push(entry);
    }

    fn open(&mut self, entry: Entry) {
        self.value(entry);
        self.open.push(self.entries.len() - 1);
    }

    fn close(&mut self) {
        let end = self.entries.len();
        if let Some(index) = self.open.pop()
            && let Some(Entry::Array { end: at, .. } | Entry::Object { end: at, .. }) =
                self.entries.get_mut(index)
        {
            *at = end;
        }
    }

    fn number<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        entry: Entry,
        write: impl FnOnce(&mut Counted<'_, W>) -> io::Result<()>,
    ) -> io::Result<()> {
        self.value(entry);
        self.write(writer, write)
    }
}

impl Formatter for &mut Recorder {
    fn write_null<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.value(Entry::Null);
        self.write(writer, |w| CompactFormatter.write_null(w))
    }

    fn write_bool<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: bool) -> io::Result<()> {
        self.value(Entry::Bool(value));
        self.write(writer, |w| CompactFormatter.write_bool(w, value))
    }

    fn write_i8<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: i8) -> io::Result<()> {
        self.write_i64(writer, value.into())
    }

    fn write_i16<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: i16) -> io::Result<()> {
        self.write_i64(writer, value.into())
    }

    fn write_i32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: i32) -> io::Result<()> {
        self.write_i64(writer, value.into())
    }

    fn write_i64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: i64) -> io::Result<()> {
        // As serde_json reads it back: a non-negative integer is a u64.
        let entry = u64::try_from(value).map_or(Entry::I64(value), Entry::U64);
        self.number(writer, entry, |w| CompactFormatter.write_i64(w, value))
    }

    fn write_i128<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: i128) -> io::Result<()> {
        let entry = if let Ok(value) = u64::try_from(value) {
            Entry::U64(value)
        } else if let Ok(value) = i64::try_from(value) {
            Entry::I64(value)
        } else {
            self.exact = false;
            Entry::Null
        };
        self.number(writer, entry, |w| CompactFormatter.write_i128(w, value))
    }

    fn write_u8<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: u8) -> io::Result<()> {
        self.write_u64(writer, value.into())
    }

    fn write_u16<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: u16) -> io::Result<()> {
        self.write_u64(writer, value.into())
    }

    fn write_u32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: u32) -> io::Result<()> {
        self.write_u64(writer, value.into())
    }

    fn write_u64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: u64) -> io::Result<()> {
        self.number(writer, Entry::U64(value), |w| {
            CompactFormatter.write_u64(w, value)
        })
    }

    fn write_u128<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: u128) -> io::Result<()> {
        let entry = u64::try_from(value).map_or_else(
            |_| {
                self.exact = false;
                Entry::Null
            },
            Entry::U64,
        );
        self.number(writer, entry, |w| CompactFormatter.write_u128(w, value))
    }

    fn write_f32<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f32) -> io::Result<()> {
        // Written in f32's shortest form, which an f64 would not round-trip to.
        self.exact = false;
        self.number(writer, Entry::Null, |w| {
            CompactFormatter.write_f32(w, value)
        })
    }

    fn write_f64<W: ?Sized + io::Write>(&mut self, writer: &mut W, value: f64) -> io::Result<()> {
        self.number(writer, Entry::F64(value), |w| {
            CompactFormatter.write_f64(w, value)
        })
    }

    fn write_number_str<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        value: &str,
    ) -> io::Result<()> {
        self.exact = false;
        self.number(writer, Entry::Null, |w| {
            CompactFormatter.write_number_str(w, value)
        })
    }

    fn begin_string<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.punctuation(writer, b"\"")?;
        self.string_start = self.position;
        self.escaped = false;
        Ok(())
    }

    fn end_string<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.value(Entry::Str {
            start: self.string_start,
            end: self.position,
            escaped: self.escaped,
        });
        self.punctuation(writer, b"\"")
    }

    fn write_string_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        self.punctuation(writer, fragment.as_bytes())
    }

    fn write_char_escape<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        char_escape: CharEscape,
    ) -> io::Result<()> {
        self.escaped = true;
        self.write(writer, |w| {
            CompactFormatter.write_char_escape(w, char_escape)
        })
    }

    fn begin_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(Entry::Array { len: 0, end: 0 });
        self.punctuation(writer, b"[")
    }

    fn end_array<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close();
        self.punctuation(writer, b"]")
    }

    fn begin_array_value<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.punctuation(writer, if first { b"" } else { b"," })
    }

    fn end_array_value<W: ?Sized + io::Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        Ok(())
    }

    fn begin_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.open(Entry::Object { len: 0, end: 0 });
        self.punctuation(writer, b"{")
    }

    fn end_object<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.close();
        self.punctuation(writer, b"}")
    }

    fn begin_object_key<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        first: bool,
    ) -> io::Result<()> {
        self.punctuation(writer, if first { b"" } else { b"," })?;
        self.key_start = Some(self.position);
        self.escaped = false;
        Ok(())
    }

    fn end_object_key<W: ?Sized + io::Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        // The name as written, quotes excluded (a number key is written quoted too).
        if let Some(start) = self.key_start.take() {
            self.entries.push(Entry::Str {
                start: start + 1,
                end: self.position.saturating_sub(1).max(start + 1),
                escaped: self.escaped,
            });
        }
        Ok(())
    }

    fn begin_object_value<W: ?Sized + io::Write>(&mut self, writer: &mut W) -> io::Result<()> {
        self.punctuation(writer, b":")
    }

    fn end_object_value<W: ?Sized + io::Write>(&mut self, _writer: &mut W) -> io::Result<()> {
        Ok(())
    }

    fn write_raw_fragment<W: ?Sized + io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> io::Result<()> {
        self.exact = false;
        self.value(Entry::Null);
        self.write(writer, |w| CompactFormatter.write_raw_fragment(w, fragment))
    }
}

/// The [`Json`] representation of a [`Document`], for `jsonschema`.
pub(crate) struct Tape;

impl Json for Tape {
    type Node<'a> = TapeNode<'a>;
    type PreparedKey = String;
    type StringBuffer = Option<Document>;
    const ACYCLIC: bool = true;
    // A lookup is a scan of the members, so one pass over them beats several lookups
    // (a bound, not `usize::MAX`: jsonschema multiplies it).
    const KEYS_PER_LOOKUP: usize = 8;

    fn prepare_key(key: &str) -> String {
        key.to_owned()
    }

    fn with_string_node<T>(
        buffer: &mut Option<Document>,
        string: &str,
        f: impl FnOnce(TapeNode<'_>) -> T,
    ) -> T {
        // A one-string document of the name, unescaped text and all.
        let document = buffer.get_or_insert_with(|| Document {
            text: String::new(),
            entries: Vec::with_capacity(1),
        });
        document.text.clear();
        document.text.push_str(string);
        document.entries.clear();
        document.entries.push(Entry::Str {
            start: 0,
            end: string.len(),
            escaped: false,
        });
        f(document.root())
    }
}

/// One value of a [`Document`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct TapeNode<'a> {
    document: &'a Document,
    index: usize,
}

impl TapeNode<'_> {
    fn entry(&self) -> Entry {
        self.document
            .entries
            .get(self.index)
            .copied()
            .unwrap_or(Entry::Null)
    }
}

/// A number of a [`Document`].
#[derive(Debug, Clone, Copy)]
pub(crate) enum TapeNumber {
    U64(u64),
    I64(i64),
    F64(f64),
}

impl TapeNumber {
    fn number(self) -> Number {
        match self {
            TapeNumber::U64(number) => number.into(),
            TapeNumber::I64(number) => number.into(),
            // A non-finite f64 is written `null`, so never recorded as a number.
            TapeNumber::F64(number) => Number::from_f64(number).unwrap_or_else(|| 0.into()),
        }
    }
}

impl JsonNumber for TapeNumber {
    fn as_u64(&self) -> Option<u64> {
        match *self {
            TapeNumber::U64(number) => Some(number),
            _ => None,
        }
    }

    fn as_i64(&self) -> Option<i64> {
        match *self {
            TapeNumber::U64(number) => i64::try_from(number).ok(),
            TapeNumber::I64(number) => Some(number),
            TapeNumber::F64(_) => None,
        }
    }

    fn as_f64(&self) -> Option<f64> {
        Some(match *self {
            TapeNumber::U64(number) => number as f64,
            TapeNumber::I64(number) => number as f64,
            TapeNumber::F64(number) => number,
        })
    }

    fn as_str(&self) -> Cow<'_, str> {
        Cow::Owned(self.number().to_string())
    }

    fn to_number(&self) -> Cow<'_, Number> {
        Cow::Owned(self.number())
    }

    fn is_integer(&self) -> bool {
        match *self {
            TapeNumber::U64(_) | TapeNumber::I64(_) => true,
            TapeNumber::F64(number) => number.fract() == 0.0,
        }
    }

    fn is_written_as_integer(&self) -> bool {
        matches!(self, TapeNumber::U64(_) | TapeNumber::I64(_))
    }
}

impl<'a> Node<'a, Tape> for TapeNode<'a> {
    type Object = TapeNode<'a>;
    type Array = TapeNode<'a>;
    type Number = TapeNumber;

    fn as_object(&self) -> Option<TapeNode<'a>> {
        matches!(self.entry(), Entry::Object { .. }).then_some(*self)
    }

    fn as_array(&self) -> Option<TapeNode<'a>> {
        matches!(self.entry(), Entry::Array { .. }).then_some(*self)
    }

    fn as_string(&self) -> Option<Cow<'a, str>> {
        self.document.string(self.index)
    }

    fn as_number(&self) -> Option<TapeNumber> {
        match self.entry() {
            Entry::U64(number) => Some(TapeNumber::U64(number)),
            Entry::I64(number) => Some(TapeNumber::I64(number)),
            Entry::F64(number) => Some(TapeNumber::F64(number)),
            _ => None,
        }
    }

    fn as_boolean(&self) -> Option<bool> {
        match self.entry() {
            Entry::Bool(boolean) => Some(boolean),
            _ => None,
        }
    }

    fn is_null(&self) -> bool {
        self.entry() == Entry::Null
    }

    fn json_type(&self) -> JsonType {
        match self.entry() {
            Entry::Null => JsonType::Null,
            Entry::Bool(_) => JsonType::Boolean,
            Entry::U64(_) | Entry::I64(_) | Entry::F64(_) => JsonType::Number,
            Entry::Str { .. } => JsonType::String,
            Entry::Array { .. } => JsonType::Array,
            Entry::Object { .. } => JsonType::Object,
        }
    }

    fn equals_value(&self, expected: &Value) -> bool {
        match (self.entry(), expected) {
            (Entry::Str { .. }, Value::String(expected)) => self
                .as_string()
                .is_some_and(|string| string == expected.as_str()),
            (Entry::Str { .. }, _) => false,
            _ => jsonschema::json::cmp::equal(&self.to_value(), expected),
        }
    }

    fn to_value(&self) -> Cow<'a, Value> {
        Cow::Owned(self.document.value(self.index))
    }

    fn identity(&self) -> Option<NodeIdentity> {
        Some(NodeIdentity::tagged(
            std::ptr::from_ref(self.document) as usize,
            u32::try_from(self.index).ok()?,
        ))
    }
}

/// An object's members, as names and nodes.
pub(crate) struct TapeMembers<'a> {
    document: &'a Document,
    members: Members<'a>,
}

impl<'a> Iterator for TapeMembers<'a> {
    type Item = (Cow<'a, str>, TapeNode<'a>);

    fn next(&mut self) -> Option<Self::Item> {
        let (name, value) = self.members.next()?;
        let document = self.document;
        Some((
            document.string(name).unwrap_or_default(),
            TapeNode {
                document,
                index: value,
            },
        ))
    }
}

/// An array's elements, as nodes.
pub(crate) struct TapeElements<'a> {
    document: &'a Document,
    elements: Elements<'a>,
}

impl<'a> Iterator for TapeElements<'a> {
    type Item = TapeNode<'a>;

    fn next(&mut self) -> Option<TapeNode<'a>> {
        let index = self.elements.next()?;
        Some(TapeNode {
            document: self.document,
            index,
        })
    }
}

impl<'a> Object<'a, Tape> for TapeNode<'a> {
    type Node = TapeNode<'a>;
    type MemberName = Cow<'a, str>;
    type MembersIter = TapeMembers<'a>;

    fn len(&self) -> usize {
        match self.entry() {
            Entry::Object { len, .. } => len,
            _ => 0,
        }
    }

    fn get(&self, key: &String) -> Option<TapeNode<'a>> {
        let document = self.document;
        Members::new(document, self.index)
            .find(|&(name, _)| match document.raw(name) {
                Some((raw, false)) => raw == key,
                Some((_, true)) => document
                    .string(name)
                    .is_some_and(|name| name == key.as_str()),
                None => false,
            })
            .map(|(_, value)| TapeNode {
                document,
                index: value,
            })
    }

    fn members(&self) -> TapeMembers<'a> {
        TapeMembers {
            document: self.document,
            members: Members::new(self.document, self.index),
        }
    }
}

impl<'a> Array<'a, Tape> for TapeNode<'a> {
    type Node = TapeNode<'a>;
    type ElementsIter = TapeElements<'a>;

    fn len(&self) -> usize {
        match self.entry() {
            Entry::Array { len, .. } => len,
            _ => 0,
        }
    }

    fn elements(&self) -> TapeElements<'a> {
        TapeElements {
            document: self.document,
            elements: Elements::new(self.document, self.index),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde_json::json;

    use super::*;

    /// The text is serde_json's own, and the index reads back the value written.
    #[test]
    fn the_index_reads_back_what_serde_json_writes() {
        let values = [
            json!({}),
            json!([]),
            json!("plain"),
            json!(-7),
            json!({
                "a": [1, -2, 3.5, 18446744073709551615u64, -9223372036854775808i64, true, false, null],
                "nested": {"empty": {}, "list": [[], [{}], {"x": [1, [2, [3]]]}]},
                "escapes \"quoted\" \\ \n\t\u{1}": "line\nbreak \"q\" \\ \u{7f} é 🦀 \u{0}",
                "unicode é": "ü",
                "": "",
                "last": 0.1,
            }),
        ];
        for value in values {
            let document = Document::serialize(&value, 0)
                .expect("serializes")
                .expect("exact");
            assert_eq!(document.value(0), value);
            assert_eq!(
                document.root().to_value().into_owned(),
                value,
                "through the node"
            );
            assert_eq!(
                document.into_bytes(),
                serde_json::to_vec(&value).expect("serializes"),
                "{value}"
            );
        }
    }

    #[test]
    fn members_and_elements_are_found_in_order() {
        let value = json!({"b": [10, {"k\"ey": "v"}], "a": {"c": null}, "e\\": "x\ny"});
        let document = Document::serialize(&value, 0).unwrap().unwrap();
        let root = document.root();
        let object = root.as_object().unwrap();
        assert_eq!(Object::len(&object), 3);
        let names: Vec<String> = object
            .members()
            .map(|(name, _)| name.into_owned())
            .collect();
        // Serialization order (serde_json's map is sorted).
        assert_eq!(names, ["a", "b", "e\\"]);
        let list = object.get(&"b".to_owned()).unwrap().as_array().unwrap();
        assert_eq!(Array::len(&list), 2);
        let elements: Vec<Value> = list.elements().map(|e| e.to_value().into_owned()).collect();
        assert_eq!(elements, [json!(10), json!({"k\"ey": "v"})]);
        let inner = list.elements().nth(1).unwrap().as_object().unwrap();
        assert_eq!(
            inner.get(&"k\"ey".to_owned()).unwrap().as_string().unwrap(),
            "v"
        );
        assert_eq!(
            object.get(&"e\\".to_owned()).unwrap().as_string().unwrap(),
            "x\ny"
        );
        assert!(object.get(&"missing".to_owned()).is_none());
        assert!(object.get(&"a".to_owned()).unwrap().as_object().is_some());
        let numbers = list.elements().next().unwrap();
        assert_eq!(numbers.as_number().unwrap().as_u64(), Some(10));
        assert_ne!(root.identity(), numbers.identity());
        assert_eq!(
            numbers.identity(),
            list.elements().next().unwrap().identity()
        );
    }

    #[derive(Serialize)]
    struct Repeated {
        name: &'static str,
        #[serde(flatten)]
        more: BTreeMap<&'static str, &'static str>,
    }

    /// What the index cannot hold exactly is left to the `Value` path.
    #[test]
    fn inexact_messages_are_refused() {
        let repeated = Repeated {
            name: "a",
            more: [("name", "b")].into_iter().collect(),
        };
        assert!(Document::serialize(&repeated, 0).unwrap().is_none());
        let unique = Repeated {
            name: "a",
            more: [("other", "b")].into_iter().collect(),
        };
        assert!(Document::serialize(&unique, 0).unwrap().is_some());
        // Objects with more names than the check keeps on the stack.
        let names: Vec<String> = (0..40).map(|n| format!("k{n}")).collect();
        let many = |last: &'static str| Repeated {
            name: "a",
            more: names
                .iter()
                .map(|name| -> &'static str { Box::leak(name.clone().into_boxed_str()) })
                .chain([last])
                .map(|name| (name, "v"))
                .collect(),
        };
        assert!(Document::serialize(&many("name"), 0).unwrap().is_none());
        assert!(Document::serialize(&many("k99"), 0).unwrap().is_some());
        assert!(Document::serialize(&[0.1f32], 0).unwrap().is_none());
        assert!(Document::serialize(&[u128::MAX], 0).unwrap().is_none());
        assert!(Document::serialize(&[i128::MIN], 0).unwrap().is_none());
        assert!(Document::serialize(&[7u128, 8], 0).unwrap().is_some());
        // Integer map keys are written quoted, and read back as names.
        let keyed: BTreeMap<i32, bool> = [(-1, true), (2, false)].into_iter().collect();
        let document = Document::serialize(&keyed, 0).unwrap().unwrap();
        assert_eq!(document.value(0), json!({"-1": true, "2": false}));
    }
}
