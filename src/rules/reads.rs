//! What the predicates of a rule set read from an event, found once per load, so that the router builds
//! the script context of each event from those fields only (STYLE.md: hot paths do not convert what no
//! rule looks at). The analysis is conservative: any use it does not recognise reads everything.

use std::collections::BTreeSet;

/// Which members of a map-valued context variable (`event`, `header`) predicates can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fields {
    /// The variable is used in a way the scan cannot bound (`event.keys()`, `event[name]`, passed whole).
    All,
    /// Only these top-level members are ever read.
    Only(BTreeSet<String>),
}

impl Default for Fields {
    fn default() -> Self {
        Fields::Only(BTreeSet::new())
    }
}

impl Fields {
    pub fn contains(&self, name: &str) -> bool {
        match self {
            Fields::All => true,
            Fields::Only(names) => names.contains(name),
        }
    }

    /// Adds every member `other` has (all of them, when `other` is `All`).
    pub(crate) fn extend(&mut self, other: &Fields) {
        match other {
            Fields::All => *self = Fields::All,
            Fields::Only(names) => names.iter().for_each(|n| self.add(n)),
        }
    }

    pub(crate) fn add(&mut self, name: &str) {
        if let Fields::Only(names) = self
            && !names.contains(name)
        {
            names.insert(name.to_string());
        }
    }
}

/// What a rule set's predicates read.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Reads {
    /// Members of `event` (payload fields).
    pub event: Fields,
    /// Members of `header` (the CDC header, snake_case keys).
    pub header: Fields,
    /// Top-level payload fields the `became(field, value)` helper looks up.
    pub became: Fields,
    /// Whether some predicate calls a method (`x.f(..)`): the only way an expression can change a value
    /// in the scope it is evaluated in (no assignments; a function-call-style argument is a copy).
    pub methods: bool,
}

impl Reads {
    /// Everything: what the router did before the analysis, and the answer for unusual predicates.
    pub fn all() -> Reads {
        Reads {
            event: Fields::All,
            header: Fields::All,
            became: Fields::All,
            methods: true,
        }
    }

    /// Adds what one predicate reads.
    pub fn scan(&mut self, source: &str) {
        let tokens = tokenize(source);
        let Some(tokens) = tokens else {
            // A string interpolation or something the tokenizer does not know: read everything.
            *self = Reads::all();
            return;
        };
        for (i, token) in tokens.iter().enumerate() {
            let after_dot = i > 0 && matches!(tokens[i - 1], Token::Dot);
            match token {
                Token::Ident(name) if !after_dot && (name == "event" || name == "header") => {
                    let fields = if name == "event" {
                        &mut self.event
                    } else {
                        &mut self.header
                    };
                    match member(&tokens[i + 1..]) {
                        Some(member) => fields.add(member),
                        None => *fields = Fields::All,
                    }
                }
                Token::Ident(name) if !after_dot && name == "became" => {
                    match (tokens.get(i + 1), tokens.get(i + 2), tokens.get(i + 3)) {
                        (Some(Token::Open('(')), Some(Token::Str(field)), Some(Token::Comma)) => {
                            let top = field.split('.').next().unwrap_or(field);
                            self.became.add(top);
                        }
                        _ => self.became = Fields::All,
                    }
                }
                // A function pointer (`Fn("became")`) calls the helper with arguments the scan cannot see.
                Token::Str(text) if text == "became" => self.became = Fields::All,
                Token::Dot => {
                    if let (Some(Token::Ident(_)), Some(Token::Open('('))) = (tokens.get(i + 1), tokens.get(i + 2)) {
                        self.methods = true;
                    }
                }
                _ => {}
            }
        }
    }
}

/// The member read right after a map variable: `.name` / `?.name` (not a method call), or `["name"]`.
fn member(rest: &[Token]) -> Option<&str> {
    match rest {
        [Token::Dot, Token::Ident(name), next @ ..] => match next.first() {
            Some(Token::Open('(')) => None,
            _ => Some(name),
        },
        [Token::Open('['), Token::Str(name), Token::Close(']'), ..] => Some(name),
        _ => None,
    }
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    Ident(String),
    Str(String),
    /// `.` or `?.`
    Dot,
    Comma,
    Open(char),
    Close(char),
    Other,
}

/// A small Rhai tokenizer: identifiers, string literals, member dots and brackets. `None` for
/// interpolated strings (code inside a string) and unterminated literals.
fn tokenize(source: &str) -> Option<Vec<Token>> {
    let chars: Vec<char> = source.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            c if c.is_whitespace() => i += 1,
            '/' if chars.get(i + 1) == Some(&'/') => {
                while i < chars.len() && chars[i] != '\n' {
                    i += 1;
                }
            }
            '/' if chars.get(i + 1) == Some(&'*') => {
                let mut depth = 0;
                loop {
                    match (chars.get(i), chars.get(i + 1)) {
                        (Some('/'), Some('*')) => {
                            depth += 1;
                            i += 2;
                        }
                        (Some('*'), Some('/')) => {
                            depth -= 1;
                            i += 2;
                            if depth == 0 {
                                break;
                            }
                        }
                        (Some(_), _) => i += 1,
                        (None, _) => return None,
                    }
                }
            }
            '"' | '\'' => {
                let mut text = String::new();
                i += 1;
                loop {
                    match chars.get(i) {
                        Some('\\') => {
                            // Escapes never spell a field name we rely on; keep the escaped char.
                            text.push(*chars.get(i + 1)?);
                            i += 2;
                        }
                        Some(&q) if q == c => {
                            i += 1;
                            break;
                        }
                        Some(&other) => {
                            text.push(other);
                            i += 1;
                        }
                        None => return None,
                    }
                }
                tokens.push(Token::Str(text));
            }
            // Backtick strings may interpolate code (`${event.X}`).
            '`' => return None,
            c if c.is_alphabetic() || c == '_' => {
                let start = i;
                while i < chars.len() && (chars[i].is_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                tokens.push(Token::Ident(chars[start..i].iter().collect()));
            }
            '?' if chars.get(i + 1) == Some(&'.') => {
                tokens.push(Token::Dot);
                i += 2;
            }
            '?' if chars.get(i + 1) == Some(&'[') => {
                tokens.push(Token::Open('['));
                i += 2;
            }
            '.' if chars.get(i + 1) == Some(&'.') => {
                // A range (`0..3`), not a member access.
                tokens.push(Token::Other);
                i += 2;
            }
            '.' if chars.get(i + 1).is_some_and(|d| d.is_ascii_digit()) => {
                tokens.push(Token::Other);
                i += 1;
            }
            '.' => {
                tokens.push(Token::Dot);
                i += 1;
            }
            ',' => {
                tokens.push(Token::Comma);
                i += 1;
            }
            '(' | '[' | '{' => {
                tokens.push(Token::Open(c));
                i += 1;
            }
            ')' | ']' | '}' => {
                tokens.push(Token::Close(c));
                i += 1;
            }
            c if c.is_ascii_digit() => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
                tokens.push(Token::Other);
            }
            _ => {
                tokens.push(Token::Other);
                i += 1;
            }
        }
    }
    Some(tokens)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reads(sources: &[&str]) -> Reads {
        let mut reads = Reads::default();
        for s in sources {
            reads.scan(s);
        }
        reads
    }

    fn only(names: &[&str]) -> Fields {
        Fields::Only(names.iter().map(|s| s.to_string()).collect())
    }

    #[test]
    fn member_reads_are_collected() {
        let r = reads(&[
            "became(\"Activation_Status__c\", \"Activating\")\n && (event.Status == () || event.Status in trigger_statuses)",
            "changed_any(customer_facing) || header.change_type == \"DELETE\"",
            "event?.BillingAddress?.City == \"Osaka\" && event[\"Name\"] != ()",
            "record.event == 1 && became(\"BillingAddress.City\", \"x\")",
        ]);
        assert_eq!(r.event, only(&["BillingAddress", "Name", "Status"]));
        assert_eq!(r.header, only(&["change_type"]));
        assert_eq!(r.became, only(&["Activation_Status__c", "BillingAddress"]));
        assert!(!r.methods);
    }

    #[test]
    fn method_calls_are_noticed() {
        assert!(reads(&["record_id.make_upper() == \"X\""]).methods);
        assert!(reads(&["is_blank(event.A) && Fn(\"is_gap\").call()"]).methods);
        assert!(!reads(&["changed(\"A.b\") && event.A?.b == 1.5"]).methods);
    }

    #[test]
    fn unbounded_uses_read_everything() {
        assert_eq!(reads(&["event.keys().len() > 3"]).event, Fields::All);
        assert_eq!(reads(&["is_blank(event)"]).event, Fields::All);
        assert_eq!(reads(&["event[name] == 1"]).event, Fields::All);
        assert_eq!(reads(&["[1].map(|event| event.X).len() > 0"]).event, Fields::All);
        assert_eq!(reads(&["header == ()"]).header, Fields::All);
        assert_eq!(reads(&["became(field_var, 1)"]).became, Fields::All);
        assert_eq!(reads(&["Fn(\"became\").call(\"A\", 1)"]).became, Fields::All);
        assert_eq!(reads(&["`${event.X}` == \"1\""]), Reads::all());
    }

    #[test]
    fn strings_and_comments_are_not_code() {
        let r = reads(&["\"event.X\" == 'event' // event.Y\n && /* header.z */ event.W == 1.5"]);
        assert_eq!(r.event, only(&["W"]));
        assert_eq!(r.header, only(&[]));
    }
}
