//! Where each key of a config file is, so that the problems `validate` finds after parsing (a channel that is no
//! channel, a zero timeout) name the `file:line:col` of the key they are about, as the parser's own errors do.
//!
//! The file is read a second time into a tree of positions only (serde-saphyr's `Spanned` on every key and
//! item): the typed `Config` stays plain data, and a tagged enum (`SinkConfig`), where spans do not survive
//! (reference/dependencies.md), costs nothing here.

use std::collections::HashMap;
use std::fmt;

use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::Spanned;

/// Positions (line, column; 1-based) by key path: `sinks.hook.url`, `rules.0`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spans(HashMap<String, (u64, u64)>);

impl Spans {
    /// The positions of every key and sequence item of `text`; none when it is not YAML.
    pub fn of(text: &str) -> Spans {
        let mut spans = HashMap::new();
        if let Ok(root) = serde_saphyr::from_str::<Node>(text) {
            root.collect("", &mut spans);
        }
        Spans(spans)
    }

    /// Where `path` is (its key, or its item in a list), else where its nearest ancestor is; (0, 0) when the file
    /// has none of it (a value that came from a default).
    pub fn at(&self, path: &[&str]) -> (u64, u64) {
        (1..=path.len())
            .rev()
            .find_map(|n| self.0.get(&path[..n].join(".")).copied())
            .unwrap_or((0, 0))
    }
}

/// A YAML value's children with their positions; scalars have none.
struct Node(Vec<(String, (u64, u64), Node)>);

impl Node {
    fn collect(self, prefix: &str, out: &mut HashMap<String, (u64, u64)>) {
        for (name, at, child) in self.0 {
            let path = if prefix.is_empty() {
                name
            } else {
                format!("{prefix}.{name}")
            };
            child.collect(&path, out);
            out.entry(path).or_insert(at);
        }
    }
}

fn place<T>(s: &Spanned<T>) -> (u64, u64) {
    (s.referenced.line(), s.referenced.column())
}

impl<'de> Deserialize<'de> for Node {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(NodeVisitor)
    }
}

struct NodeVisitor;

impl<'de> Visitor<'de> for NodeVisitor {
    type Value = Node;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("any YAML value")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Node, A::Error> {
        let mut children = Vec::new();
        while let Some(key) = map.next_key::<Spanned<Key>>()? {
            let value: Node = map.next_value()?;
            children.push((key.value.0.clone(), place(&key), value));
        }
        Ok(Node(children))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Node, A::Error> {
        let mut children = Vec::new();
        while let Some(item) = seq.next_element::<Spanned<Node>>()? {
            let at = place(&item);
            children.push((children.len().to_string(), at, item.value));
        }
        Ok(Node(children))
    }

    fn visit_some<D: Deserializer<'de>>(self, d: D) -> Result<Node, D::Error> {
        Node::deserialize(d)
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Node, E> {
        Ok(Node(Vec::new()))
    }

    fn visit_i64<E: de::Error>(self, _: i64) -> Result<Node, E> {
        Ok(Node(Vec::new()))
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<Node, E> {
        Ok(Node(Vec::new()))
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<Node, E> {
        Ok(Node(Vec::new()))
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<Node, E> {
        Ok(Node(Vec::new()))
    }

    fn visit_unit<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node(Vec::new()))
    }

    fn visit_none<E: de::Error>(self) -> Result<Node, E> {
        Ok(Node(Vec::new()))
    }
}

/// A mapping key as text (keys may be numbers or booleans in YAML).
struct Key(String);

impl<'de> Deserialize<'de> for Key {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeyVisitor;
        impl Visitor<'_> for KeyVisitor {
            type Value = Key;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a mapping key")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Key, E> {
                Ok(Key(v.to_string()))
            }
        }
        d.deserialize_any(KeyVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::Spans;

    #[test]
    fn keys_and_items_have_their_places_in_block_and_flow_style() {
        let text = "mode: cdc\nchannels:\n  orders: /data/OrderChangeEvent\nsinks:\n  hook: { kind: webhook, url: ftp://x }\nrules:\n  - rules/\n  - more.yaml\n";
        let spans = Spans::of(text);
        assert_eq!(spans.at(&["mode"]), (1, 1));
        assert_eq!(spans.at(&["channels", "orders"]), (3, 3));
        assert_eq!(spans.at(&["sinks", "hook"]), (5, 3));
        assert_eq!(spans.at(&["sinks", "hook", "url"]), (5, 26));
        assert_eq!(spans.at(&["rules", "1"]), (8, 5));
        // Not in the file: its nearest ancestor, else nowhere.
        assert_eq!(spans.at(&["sinks", "hook", "timeout_ms"]), (5, 3));
        assert_eq!(spans.at(&["delivery", "concurrency"]), (0, 0));
        assert_eq!(Spans::of(": : not yaml [").at(&["mode"]), (0, 0));
    }
}
