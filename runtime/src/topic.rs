//! Topic-exchange matching, exactly as RabbitMQ does it, with a trie.
//!
//! A routing key is split on every `.` into words; empty words are words
//! (`a..b` is `a`, ``, `b`), but the empty key `""` has no words at all (as
//! RabbitMQ's `split_topic_key` does). In a binding pattern, `*` matches
//! exactly one word and `#` zero or more; wildcards count only as whole words
//! (`a*` is a literal word).
//!
//! Matching walks the trie as a set of states (an NFA simulation): each key
//! word moves every state along its literal edge, its `*` edge, and keeps
//! states reached through `#` in place. States are deduplicated at each step,
//! so patterns like `#.#.#` cost at most one state per trie node instead of
//! exploring every way to split the key.

use std::collections::HashMap;

/// The words of a routing key or pattern, as RabbitMQ splits them: `""` has
/// none, otherwise every `.` separates two (possibly empty) words.
pub fn split_words(key: &str) -> impl Iterator<Item = &str> {
    // `"".split('.')` yields one empty word; RabbitMQ yields none.
    key.split('.').filter(move |_| !key.is_empty())
}

/// Whether `key` matches the topic `pattern` (reference implementation of the
/// rules, without a trie: for one-off checks).
pub fn pattern_matches(pattern: &str, key: &str) -> bool {
    let mut trie = TopicTrie::new();
    trie.insert(pattern, ());
    !trie.matches(key).is_empty()
}

/// Values bound by routing-key patterns, found by the keys that match them.
///
/// Each value is stored once per pattern: inserting the same `(pattern, value)`
/// twice keeps one copy (binding twice is idempotent in AMQP).
#[derive(Debug, Clone)]
pub struct TopicTrie<T> {
    root: Node<T>,
    len: usize,
}

#[derive(Debug, Clone)]
struct Node<T> {
    literal: HashMap<Box<str>, Node<T>>,
    one_word: Option<Box<Node<T>>>,
    any_words: Option<Box<Node<T>>>,
    values: Vec<T>,
}

impl<T> Default for Node<T> {
    fn default() -> Self {
        Node {
            literal: HashMap::new(),
            one_word: None,
            any_words: None,
            values: Vec::new(),
        }
    }
}

impl<T> Node<T> {
    fn is_empty(&self) -> bool {
        self.values.is_empty()
            && self.literal.is_empty()
            && self.one_word.is_none()
            && self.any_words.is_none()
    }
}

impl<T> Default for TopicTrie<T> {
    fn default() -> Self {
        TopicTrie {
            root: Node::default(),
            len: 0,
        }
    }
}

/// A matching state: a trie node, and whether it was reached through a `#`
/// edge (such a node also consumes any further word by staying in place).
struct State<'a, T> {
    node: &'a Node<T>,
    loops: bool,
}

// Derived impls would needlessly require `T: Copy`.
impl<T> Clone for State<'_, T> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T> Copy for State<'_, T> {}

impl<T> State<'_, T> {
    fn id(&self) -> usize {
        std::ptr::from_ref(self.node) as usize
    }
}

impl<T: PartialEq> TopicTrie<T> {
    /// An empty trie.
    pub fn new() -> Self {
        Self::default()
    }

    /// The number of `(pattern, value)` bindings stored.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no binding is stored.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Binds `value` with `pattern`; returns `false` if that exact binding
    /// already existed (nothing changes then).
    pub fn insert(&mut self, pattern: &str, value: T) -> bool {
        let mut node = &mut self.root;
        for word in split_words(pattern) {
            node = match word {
                "*" => node.one_word.get_or_insert_with(Box::default),
                "#" => node.any_words.get_or_insert_with(Box::default),
                _ => node.literal.entry(word.into()).or_default(),
            };
        }
        if node.values.contains(&value) {
            return false;
        }
        node.values.push(value);
        self.len += 1;
        true
    }

    /// Removes the binding of `value` with `pattern`; returns whether it
    /// existed. Trie nodes left without bindings or children are freed.
    pub fn remove(&mut self, pattern: &str, value: &T) -> bool {
        let words: Vec<&str> = split_words(pattern).collect();
        let removed = remove_at(&mut self.root, &words, value);
        if removed {
            self.len -= 1;
        }
        removed
    }

    /// Removes every binding of `value`, whatever its pattern; returns how
    /// many were removed.
    pub fn remove_value(&mut self, value: &T) -> usize {
        let removed = remove_everywhere(&mut self.root, value);
        self.len -= removed;
        removed
    }
}

fn remove_at<T: PartialEq>(node: &mut Node<T>, words: &[&str], value: &T) -> bool {
    let Some((word, rest)) = words.split_first() else {
        let before = node.values.len();
        node.values.retain(|v| v != value);
        return node.values.len() != before;
    };
    match *word {
        "*" | "#" => {
            let slot = if *word == "*" {
                &mut node.one_word
            } else {
                &mut node.any_words
            };
            let Some(child) = slot.as_deref_mut() else {
                return false;
            };
            let removed = remove_at(child, rest, value);
            if child.is_empty() {
                *slot = None;
            }
            removed
        }
        _ => {
            let Some(child) = node.literal.get_mut(*word) else {
                return false;
            };
            let removed = remove_at(child, rest, value);
            if child.is_empty() {
                node.literal.remove(*word);
            }
            removed
        }
    }
}

fn remove_everywhere<T: PartialEq>(node: &mut Node<T>, value: &T) -> usize {
    let before = node.values.len();
    node.values.retain(|v| v != value);
    let mut removed = before - node.values.len();
    for slot in [&mut node.one_word, &mut node.any_words] {
        if let Some(child) = slot.as_deref_mut() {
            removed += remove_everywhere(child, value);
            if child.is_empty() {
                *slot = None;
            }
        }
    }
    node.literal.retain(|_, child| {
        removed += remove_everywhere(child, value);
        !child.is_empty()
    });
    removed
}

impl<T: Ord> TopicTrie<T> {
    /// The values whose patterns match the routing `key`, each once, sorted.
    pub fn matches(&self, key: &str) -> Vec<&T> {
        let mut found = Vec::new();
        self.matches_into(key, &mut found);
        found.sort_unstable();
        found.dedup();
        found
    }

    /// The values bound by any pattern matching any of `keys` (a message's
    /// routing key and its CC keys), each once, sorted.
    pub fn matches_any<'k>(&self, keys: impl IntoIterator<Item = &'k str>) -> Vec<&T> {
        let mut found = Vec::new();
        for key in keys {
            self.matches_into(key, &mut found);
        }
        found.sort_unstable();
        found.dedup();
        found
    }

    /// Appends the values matching `key` to `found` (possibly repeated).
    fn matches_into<'a>(&'a self, key: &str, found: &mut Vec<&'a T>) {
        let mut current = vec![State {
            node: &self.root,
            loops: false,
        }];
        close_over_any_words(&mut current);
        let mut next = Vec::with_capacity(current.len());
        for word in split_words(key) {
            next.clear();
            for state in &current {
                if state.loops {
                    next.push(*state);
                }
                if let Some(child) = state.node.literal.get(word) {
                    next.push(State {
                        node: child,
                        loops: false,
                    });
                }
                if let Some(child) = state.node.one_word.as_deref() {
                    next.push(State {
                        node: child,
                        loops: false,
                    });
                }
            }
            if next.is_empty() {
                return;
            }
            close_over_any_words(&mut next);
            std::mem::swap(&mut current, &mut next);
        }
        for state in &current {
            found.extend(state.node.values.iter());
        }
    }
}

/// Adds, for every state, the states reachable through `#` edges matching
/// zero words, then removes duplicate states.
fn close_over_any_words<T>(states: &mut Vec<State<'_, T>>) {
    let mut index = 0;
    while index < states.len() {
        if let Some(child) = states[index].node.any_words.as_deref() {
            states.push(State {
                node: child,
                loops: true,
            });
        }
        index += 1;
    }
    if states.len() > 1 {
        states.sort_unstable_by_key(State::id);
        states.dedup_by_key(|state| state.id());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RabbitMQ's own bindings from `topic_SUITE` (`test_topic_matching`).
    const BINDINGS: [(&str, &str); 26] = [
        ("a.b.c", "t1"),
        ("a.*.c", "t2"),
        ("a.#.b", "t3"),
        ("a.b.b.c", "t4"),
        ("#", "t5"),
        ("#.#", "t6"),
        ("#.b", "t7"),
        ("*.*", "t8"),
        ("a.*", "t9"),
        ("*.b.c", "t10"),
        ("a.#", "t11"),
        ("a.#.#", "t12"),
        ("b.b.c", "t13"),
        ("a.b.b", "t14"),
        ("a.b", "t15"),
        ("b.c", "t16"),
        ("", "t17"),
        ("*.*.*", "t18"),
        ("vodka.martini", "t19"),
        ("a.b.c", "t20"),
        ("*.#", "t21"),
        ("#.*.#", "t22"),
        ("*.#.#", "t23"),
        ("#.#.#", "t24"),
        ("*", "t25"),
        ("#.b.#", "t26"),
    ];

    fn golden_trie() -> TopicTrie<u32> {
        let mut trie = TopicTrie::new();
        for (pattern, name) in BINDINGS {
            assert!(trie.insert(pattern, number(name)));
        }
        trie
    }

    fn number(name: &str) -> u32 {
        name[1..].parse().expect("test binding names are t<number>")
    }

    fn expect(trie: &TopicTrie<u32>, key: &str, expected: &[u32]) {
        let found: Vec<u32> = trie.matches(key).into_iter().copied().collect();
        assert_eq!(found, expected, "routing key {key:?}");
    }

    /// The expected sets are RabbitMQ's (topic_SUITE), completed for keys the
    /// suite does not list by applying the same rules.
    #[test]
    fn rabbitmq_golden_table() {
        let trie = golden_trie();
        expect(
            &trie,
            "a.b.c",
            &[1, 2, 5, 6, 10, 11, 12, 18, 20, 21, 22, 23, 24, 26],
        );
        expect(
            &trie,
            "a.b",
            &[3, 5, 6, 7, 8, 9, 11, 12, 15, 21, 22, 23, 24, 26],
        );
        expect(
            &trie,
            "a.b.b",
            &[3, 5, 6, 7, 11, 12, 14, 18, 21, 22, 23, 24, 26],
        );
        expect(&trie, "", &[5, 6, 17, 24]);
        expect(&trie, "b.c.c", &[5, 6, 18, 21, 22, 23, 24, 26]);
        expect(&trie, "a.a.a.a.a", &[5, 6, 11, 12, 21, 22, 23, 24]);
        expect(&trie, "vodka.gin", &[5, 6, 8, 21, 22, 23, 24]);
        expect(&trie, "vodka.martini", &[5, 6, 8, 19, 21, 22, 23, 24]);
        expect(&trie, "b.b.c", &[5, 6, 10, 13, 18, 21, 22, 23, 24, 26]);
        expect(&trie, "nothing.here.at.all", &[5, 6, 21, 22, 23, 24]);
        expect(&trie, "oneword", &[5, 6, 21, 22, 23, 24, 25]);
        // Derived from the rules (not in RabbitMQ's table).
        expect(&trie, "a.b.b.c", &[4, 5, 6, 11, 12, 21, 22, 23, 24, 26]);
        expect(&trie, "a", &[5, 6, 11, 12, 21, 22, 23, 24, 25]);
        expect(&trie, "b", &[5, 6, 7, 21, 22, 23, 24, 25, 26]);
    }

    #[test]
    fn empty_words_are_words() {
        let trie = golden_trie();
        // `a..b`: words `a`, ``, `b`.
        expect(&trie, "a..b", &[3, 5, 6, 7, 11, 12, 18, 21, 22, 23, 24, 26]);
        // `.`: two empty words.
        expect(&trie, ".", &[5, 6, 8, 21, 22, 23, 24]);
        // `a.`: `a` and an empty word.
        expect(&trie, "a.", &[5, 6, 8, 9, 11, 12, 21, 22, 23, 24]);

        let mut trie = TopicTrie::new();
        trie.insert("a..b", 1);
        trie.insert("a.*.b", 2);
        trie.insert(".", 3);
        trie.insert("*", 4);
        trie.insert("", 5);
        expect(&trie, "a..b", &[1, 2]);
        expect(&trie, "a.x.b", &[2]);
        expect(&trie, ".", &[3]);
        // The empty key has no word, so `*` does not match it; `""` does.
        expect(&trie, "", &[5]);
        expect(&trie, "x", &[4]);
    }

    #[test]
    fn wildcards_only_as_whole_words() {
        let mut trie = TopicTrie::new();
        trie.insert("a*", 1);
        trie.insert("#b", 2);
        trie.insert("a.*x", 3);
        expect(&trie, "a*", &[1]);
        expect(&trie, "ab", &[]);
        expect(&trie, "#b", &[2]);
        expect(&trie, "xb", &[]);
        expect(&trie, "a.*x", &[3]);
        expect(&trie, "a.yx", &[]);
    }

    #[test]
    fn removal_matches_rabbitmq_after_removing() {
        let mut trie = golden_trie();
        // RabbitMQ removes bindings 1, 5, 11, 19, 21 of its list.
        for n in [1, 5, 11, 19, 21] {
            let (pattern, name) = BINDINGS[n - 1];
            assert!(trie.remove(pattern, &number(name)), "removing {pattern}");
            assert!(!trie.remove(pattern, &number(name)), "removed twice");
        }
        assert_eq!(trie.len(), 21);
        expect(&trie, "a.b.c", &[2, 6, 10, 12, 18, 20, 22, 23, 24, 26]);
        expect(&trie, "a.b", &[3, 6, 7, 8, 9, 12, 15, 22, 23, 24, 26]);
        expect(&trie, "a.b.b", &[3, 6, 7, 12, 14, 18, 22, 23, 24, 26]);
        expect(&trie, "", &[6, 17, 24]);
        expect(&trie, "b.c.c", &[6, 18, 22, 23, 24, 26]);
        expect(&trie, "a.a.a.a.a", &[6, 12, 22, 23, 24]);
        expect(&trie, "vodka.gin", &[6, 8, 22, 23, 24]);
        expect(&trie, "vodka.martini", &[6, 8, 22, 23, 24]);
        expect(&trie, "b.b.c", &[6, 10, 13, 18, 22, 23, 24, 26]);
        expect(&trie, "nothing.here.at.all", &[6, 22, 23, 24]);
        expect(&trie, "oneword", &[6, 22, 23, 24, 25]);
    }

    #[test]
    fn removing_everything_frees_the_trie() {
        let mut trie = golden_trie();
        for (pattern, name) in BINDINGS {
            assert!(trie.remove(pattern, &number(name)));
        }
        assert!(trie.is_empty());
        assert!(trie.root.is_empty());
        expect(&trie, "a.b.c", &[]);
    }

    #[test]
    fn remove_value_drops_all_its_patterns() {
        let mut trie = TopicTrie::new();
        trie.insert("a.#", "q1");
        trie.insert("*.b", "q1");
        trie.insert("a.b", "q2");
        assert_eq!(trie.remove_value(&"q1"), 2);
        assert_eq!(trie.len(), 1);
        assert_eq!(trie.matches("a.b"), vec![&"q2"]);
        assert_eq!(trie.remove_value(&"q1"), 0);
    }

    #[test]
    fn a_value_matches_once_however_many_patterns_match() {
        let mut trie = TopicTrie::new();
        assert!(trie.insert("a.#", "q"));
        assert!(trie.insert("#.b", "q"));
        assert!(trie.insert("a.b", "q"));
        assert!(!trie.insert("a.b", "q"), "binding twice is idempotent");
        assert_eq!(trie.len(), 3);
        assert_eq!(trie.matches("a.b"), vec![&"q"]);
        assert_eq!(trie.matches_any(["a.b", "x.b", "a"]), vec![&"q"]);
        assert!(trie.matches_any(["x", "y.z"]).is_empty());
    }

    #[test]
    fn many_hashes_do_not_explode() {
        let mut trie = TopicTrie::new();
        let pattern = vec!["#"; 40].join(".");
        trie.insert(&pattern, 1);
        trie.insert(&format!("{pattern}.x.{pattern}"), 2);
        let key = vec!["w"; 200].join(".");
        expect(&trie, &key, &[1]);
        expect(&trie, &format!("{key}.x.{key}"), &[1, 2]);
    }

    /// Straight from the rules, by recursion over words (exponential, for tests only).
    fn reference_match(pattern: &[&str], key: &[&str]) -> bool {
        match (pattern.split_first(), key.split_first()) {
            (None, None) => true,
            (Some((&"#", rest)), _) => {
                (0..=key.len()).any(|skip| reference_match(rest, &key[skip..]))
            }
            (Some((&"*", rest)), Some((_, key_rest))) => reference_match(rest, key_rest),
            (Some((word, rest)), Some((key_word, key_rest))) => {
                word == key_word && reference_match(rest, key_rest)
            }
            _ => false,
        }
    }

    /// Every sequence of up to `max_len` words drawn from `alphabet`, joined with dots.
    fn all_joined(alphabet: &[&str], max_len: usize) -> Vec<String> {
        let mut all = vec![String::new()];
        let mut layer: Vec<Vec<&str>> = vec![vec![]];
        for _ in 0..max_len {
            layer = layer
                .iter()
                .flat_map(|prefix| {
                    alphabet.iter().map(move |word| {
                        let mut longer = prefix.clone();
                        longer.push(*word);
                        longer
                    })
                })
                .collect();
            all.extend(layer.iter().map(|words| words.join(".")));
        }
        all
    }

    #[test]
    fn trie_agrees_with_reference_on_every_small_case() {
        // Includes empty words; the joined `""` of one empty word is the key
        // `""`, which has zero words, so dedupe the strings first.
        let mut patterns = all_joined(&["a", "b", "", "*", "#"], 4);
        patterns.sort();
        patterns.dedup();
        let mut keys = all_joined(&["a", "b", ""], 5);
        keys.sort();
        keys.dedup();
        let mut trie = TopicTrie::new();
        for (index, pattern) in patterns.iter().enumerate() {
            trie.insert(pattern, index);
        }
        for key in &keys {
            let key_words: Vec<&str> = split_words(key).collect();
            let expected: Vec<usize> = patterns
                .iter()
                .enumerate()
                .filter(|(_, pattern)| {
                    let words: Vec<&str> = split_words(pattern).collect();
                    reference_match(&words, &key_words)
                })
                .map(|(index, _)| index)
                .collect();
            let found: Vec<usize> = trie.matches(key).into_iter().copied().collect();
            assert_eq!(found, expected, "routing key {key:?}");
        }
    }

    #[test]
    fn pattern_matches_agrees_with_rules() {
        assert!(pattern_matches("a.#", "a"));
        assert!(pattern_matches("#", ""));
        assert!(!pattern_matches("*", ""));
        assert!(pattern_matches("*.*", "."));
        assert!(!pattern_matches("a.b", "a.b.c"));
    }

    #[test]
    fn split_words_follows_rabbitmq() {
        assert_eq!(split_words("").count(), 0);
        assert_eq!(split_words(".").collect::<Vec<_>>(), ["", ""]);
        assert_eq!(split_words("a..b").collect::<Vec<_>>(), ["a", "", "b"]);
    }
}
