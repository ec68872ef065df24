//! `switchyard lsp`: a language server on stdio for rule files, rule test files and the config. On open and on
//! every change it publishes exactly what `switchyard validate` reports for the file (the same code, the same
//! messages and places; the editor's unsaved text stands in for the file), offers completion of helpers, `vars`,
//! context variables and sink names, and shows a helper's one-line doc on hover.
//!
//! Built on `lsp-server` (rust-analyzer's synchronous scaffold: stdio transport and JSON-RPC framing, nothing
//! async to reconcile with the rule engine, which is synchronous) and `lsp-types`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use lsp_server::{Connection, Message, Notification, Request, Response};
use lsp_types::notification::{
    DidChangeTextDocument, DidCloseTextDocument, DidOpenTextDocument, Notification as _, PublishDiagnostics,
};
use lsp_types::request::{Completion, HoverRequest, Request as _};
use lsp_types::{
    CompletionItem, CompletionItemKind, CompletionOptions, CompletionParams, CompletionResponse, Diagnostic,
    DiagnosticSeverity, DidChangeTextDocumentParams, DidCloseTextDocumentParams, DidOpenTextDocumentParams, Hover,
    HoverContents, HoverParams, HoverProviderCapability, MarkupContent, MarkupKind, Position, PublishDiagnosticsParams,
    Range, ServerCapabilities, TextDocumentSyncCapability, TextDocumentSyncKind, Uri,
};

use crate::authoring::avro::AvroFields;
use crate::config::LoadedConfig;
use crate::diag::{Problem, Severity};
use crate::rules::helpers::HELPERS;
use crate::rules::load::RuleEnv;

/// Serves one editor on stdin/stdout until it says `exit`. `config`: the service config the rules run under
/// (channel aliases, sinks, mode); without it, the built-in names.
pub fn serve(config: Option<PathBuf>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let (connection, io) = Connection::stdio();
    let capabilities = ServerCapabilities {
        text_document_sync: Some(TextDocumentSyncCapability::Kind(TextDocumentSyncKind::FULL)),
        completion_provider: Some(CompletionOptions {
            trigger_characters: Some(vec!["(".into(), "\"".into(), " ".into(), ".".into()]),
            ..CompletionOptions::default()
        }),
        hover_provider: Some(HoverProviderCapability::Simple(true)),
        ..ServerCapabilities::default()
    };
    connection.initialize(serde_json::to_value(capabilities)?)?;
    let mut server = Server {
        connection: &connection,
        config,
        open: HashMap::new(),
    };
    server.run()?;
    // The writer thread ends once every sender is gone: drop the connection first, or joining waits forever.
    drop(server);
    drop(connection);
    io.join()?;
    Ok(())
}

struct Server<'a> {
    connection: &'a Connection,
    config: Option<PathBuf>,
    /// The open documents' current text, by path.
    open: HashMap<PathBuf, (Uri, String)>,
}

impl Server<'_> {
    fn run(&mut self) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        for message in &self.connection.receiver {
            match message {
                Message::Request(request) => {
                    if self.connection.handle_shutdown(&request)? {
                        return Ok(());
                    }
                    let response = self.respond(request);
                    self.connection.sender.send(Message::Response(response))?;
                }
                Message::Notification(n) => self.notified(n)?,
                Message::Response(_) => {}
            }
        }
        Ok(())
    }

    fn notified(&mut self, n: Notification) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let (uri, text) = match n.method.as_str() {
            DidOpenTextDocument::METHOD => {
                let p: DidOpenTextDocumentParams = serde_json::from_value(n.params)?;
                (p.text_document.uri, Some(p.text_document.text))
            }
            DidChangeTextDocument::METHOD => {
                let p: DidChangeTextDocumentParams = serde_json::from_value(n.params)?;
                // Full sync: the last change is the whole text.
                (
                    p.text_document.uri,
                    p.content_changes.into_iter().last().map(|c| c.text),
                )
            }
            DidCloseTextDocument::METHOD => {
                let p: DidCloseTextDocumentParams = serde_json::from_value(n.params)?;
                if let Some(path) = path_of(&p.text_document.uri) {
                    self.open.remove(&path);
                }
                return self.publish(p.text_document.uri, Vec::new());
            }
            _ => return Ok(()),
        };
        let (Some(path), Some(text)) = (path_of(&uri), text) else {
            return Ok(());
        };
        self.open.insert(path.clone(), (uri.clone(), text));
        let diagnostics = self.diagnose(&path);
        self.publish(uri, diagnostics)
    }

    fn publish(&self, uri: Uri, diagnostics: Vec<Diagnostic>) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
        let params = PublishDiagnosticsParams {
            uri,
            diagnostics,
            version: None,
        };
        let n = Notification::new(PublishDiagnostics::METHOD.into(), params);
        self.connection.sender.send(Message::Notification(n))?;
        Ok(())
    }

    /// What `switchyard validate` says of the file, with the open documents' texts instead of the files'.
    fn diagnose(&self, path: &Path) -> Vec<Diagnostic> {
        let overlay = |p: &Path| self.text_of(p);
        let text = overlay(path).unwrap_or_default();
        let problems = if self.is_config(path, &text) {
            match LoadedConfig::parse(path, &text, &|name| std::env::var(name).ok()) {
                Ok(_) => Vec::new(),
                Err(problems) => problems.0,
            }
        } else {
            let (env, paths) = self.rules_env(path);
            let avro = schemas_above(path);
            crate::authoring::validate::validate_with(&paths, &env, avro.as_deref(), &overlay).problems
        };
        problems
            .iter()
            .filter(|p| same_file(&p.file, path))
            .map(diagnostic)
            .collect()
    }

    /// The open document's text for the file at `p` (however the path is spelt), instead of the file's own.
    fn text_of(&self, p: &Path) -> Option<String> {
        self.open
            .iter()
            .find(|(open, _)| same_file(open, p))
            .map(|(_, (_, text))| text.clone())
    }

    /// The config file itself (the one given, or a YAML file with a top-level `source` or `sinks` and no `routes`).
    fn is_config(&self, path: &Path, text: &str) -> bool {
        if self.config.as_deref().is_some_and(|c| same_file(c, path)) {
            return true;
        }
        let top = |key: &str| text.lines().any(|l| l.starts_with(&format!("{key}:")));
        !top("routes") && !top("cases") && (top("source") || top("sinks") || top("channels"))
    }

    /// The names the rules are checked against, and the rule paths: the config's, or the file's folder.
    fn rules_env(&self, path: &Path) -> (RuleEnv, Vec<PathBuf>) {
        let folder = path.parent().map(Path::to_path_buf).unwrap_or_else(|| ".".into());
        match self.config.as_deref().map(LoadedConfig::load) {
            Some(Ok(loaded)) => {
                let paths = loaded.rule_paths();
                let covers = paths.iter().any(|p| same_file(p, path) || same_file(p, &folder));
                (RuleEnv::from_config(&loaded), if covers { paths } else { vec![folder] })
            }
            _ => (RuleEnv::defaults(), vec![folder]),
        }
    }

    fn respond(&self, request: Request) -> Response {
        let id = request.id.clone();
        match request.method.as_str() {
            Completion::METHOD => match serde_json::from_value::<CompletionParams>(request.params) {
                Ok(p) => {
                    let path = path_of(&p.text_document_position.text_document.uri);
                    let at = p.text_document_position.position;
                    let fields = path.as_deref().and_then(|path| self.field_completions(path, at));
                    let items = fields.unwrap_or_else(|| self.completions(path.as_deref()));
                    Response::new_ok(id, CompletionResponse::Array(items))
                }
                Err(e) => Response::new_err(id, lsp_server::ErrorCode::InvalidParams as i32, e.to_string()),
            },
            HoverRequest::METHOD => match serde_json::from_value::<HoverParams>(request.params) {
                Ok(p) => {
                    let at = &p.text_document_position_params;
                    let hover = path_of(&at.text_document.uri).and_then(|path| self.hover(&path, at.position));
                    Response::new_ok(id, hover)
                }
                Err(e) => Response::new_err(id, lsp_server::ErrorCode::InvalidParams as i32, e.to_string()),
            },
            _ => Response::new_err(id, lsp_server::ErrorCode::MethodNotFound as i32, "not supported".into()),
        }
    }

    /// Helpers, context variables, the rule files' `vars` and the sink names.
    fn completions(&self, path: Option<&Path>) -> Vec<CompletionItem> {
        let mut items: Vec<CompletionItem> = HELPERS
            .iter()
            .map(|h| CompletionItem {
                label: h.name.into(),
                kind: Some(CompletionItemKind::FUNCTION),
                detail: Some(h.signature.into()),
                documentation: Some(lsp_types::Documentation::String(h.doc.into())),
                ..CompletionItem::default()
            })
            .collect();
        let variable = |label: &str, detail: &str| CompletionItem {
            label: label.into(),
            kind: Some(CompletionItemKind::VARIABLE),
            detail: Some(detail.into()),
            ..CompletionItem::default()
        };
        items.extend(crate::rules::CONTEXT_VARIABLES.iter().map(|v| variable(v, "context")));
        if let Some(path) = path {
            let (env, paths) = self.rules_env(path);
            let overlay = |p: &Path| self.text_of(p);
            if let Some(rules) = crate::rules::load::load_paths_with(&paths, &env, &overlay).ruleset {
                items.extend(rules.vars.keys().map(|v| variable(v, "vars")));
            }
            items.extend(env.sinks.iter().map(|(name, kind)| CompletionItem {
                label: name.clone(),
                kind: Some(CompletionItemKind::MODULE),
                detail: Some(format!("sink ({})", kind.as_str())),
                ..CompletionItem::default()
            }));
            items.extend(crate::config::BUILT_IN_SINKS.iter().map(|name| CompletionItem {
                label: name.to_string(),
                kind: Some(CompletionItemKind::MODULE),
                detail: Some("sink (built in)".into()),
                ..CompletionItem::default()
            }));
        }
        items
    }

    /// After `event.` (or `event.Compound.`) the fields of the route's channel, with their Avro types, from the
    /// config's `avro_schemas` or a `schemas/avro` above the file; after `record.` the fields its `enrich` reads.
    /// `None` where the cursor is not after one of those.
    fn field_completions(&self, path: &Path, at: Position) -> Option<Vec<CompletionItem>> {
        let text = self.text_of(path)?;
        let line = text.lines().nth(at.line as usize)?;
        let before: String = line.chars().take(at.character as usize).collect();
        let (root, parent) = field_context(&before)?;
        let route = route_at(&text, at.line as usize + 1);
        let (env, _) = self.rules_env(path);
        let item = |name: &str, detail: String| CompletionItem {
            label: name.to_string(),
            kind: Some(CompletionItemKind::FIELD),
            detail: Some(detail),
            ..CompletionItem::default()
        };
        let schemas = env
            .avro_schemas
            .clone()
            .or_else(|| schemas_above(path))
            .and_then(|dir| AvroFields::load(&dir).ok());
        let channel = route
            .as_ref()
            .and_then(|r| r.get("channel")?.as_str())
            .map(|alias| env.channels.get(alias).cloned().unwrap_or_else(|| alias.to_string()));
        let event_fields = schemas
            .as_ref()
            .zip(channel.as_deref())
            .and_then(|(s, c)| s.for_channel(c));
        if root == "record" {
            let enrich = route.as_ref().and_then(|r| r.get("enrich"))?;
            let object = enrich.get("object").and_then(|o| o.as_str()).unwrap_or_default();
            let typed = schemas.as_ref().and_then(|s| s.for_object(object));
            let fields = enrich.get("fields")?.as_array()?;
            return Some(
                fields
                    .iter()
                    .filter_map(|f| f.as_str())
                    .map(|f| {
                        let detail = typed.and_then(|t| t.get(f)).map_or_else(
                            || format!("{object} field"),
                            |t| format!("{object} field: {}", t.type_name),
                        );
                        item(f, detail)
                    })
                    .collect(),
            );
        }
        let mut fields = event_fields?;
        if let Some(parent) = parent {
            fields = &fields.get(&parent)?.members;
        }
        Some(fields.iter().map(|(name, f)| item(name, f.type_name.clone())).collect())
    }

    /// A helper's signature and doc, for the word under the cursor.
    fn hover(&self, path: &Path, at: Position) -> Option<Hover> {
        let text = self.text_of(path)?;
        let line = text.lines().nth(at.line as usize)?;
        let chars: Vec<char> = line.chars().collect();
        let is_word = |c: &char| c.is_alphanumeric() || *c == '_';
        let cursor = (at.character as usize).min(chars.len());
        let start = chars[..cursor].iter().rposition(|c| !is_word(c)).map_or(0, |i| i + 1);
        let end = chars[cursor..]
            .iter()
            .position(|c| !is_word(c))
            .map_or(chars.len(), |i| cursor + i);
        let word: String = chars.get(start..end)?.iter().collect();
        let helper = HELPERS.iter().find(|h| h.name == word)?;
        Some(Hover {
            contents: HoverContents::Markup(MarkupContent {
                kind: MarkupKind::Markdown,
                value: format!("`{}`: {}", helper.signature, helper.doc),
            }),
            range: None,
        })
    }
}

/// `event.`, `event?.`, `event.Parent.` or `record.` (and a partly typed name after it) just before the cursor:
/// the root and the compound field, if any.
fn field_context(before: &str) -> Option<(&'static str, Option<String>)> {
    let is_word = |c: char| c.is_alphanumeric() || c == '_';
    let trimmed = before.trim_end_matches(is_word);
    let rest = trimmed.strip_suffix('.')?;
    let rest = rest.strip_suffix('?').unwrap_or(rest);
    let word_start = rest.rfind(|c: char| !is_word(c)).map_or(0, |i| i + 1);
    let word = &rest[word_start..];
    match word {
        "event" => Some(("event", None)),
        "record" => Some(("record", None)),
        parent if !parent.is_empty() => {
            let outer = rest[..word_start].strip_suffix('.')?;
            let outer = outer.strip_suffix('?').unwrap_or(outer);
            outer.ends_with("event").then(|| ("event", Some(parent.to_string())))
        }
        _ => None,
    }
}

/// The route (as YAML) whose block holds the 1-based `line` of a rule file's text.
fn route_at(text: &str, line: usize) -> Option<serde_json::Value> {
    let starts = text
        .lines()
        .take(line)
        .filter(|l| l.trim_start().starts_with("- name:") && l.starts_with(' '))
        .count();
    let file: serde_json::Value = serde_saphyr::from_str(text).ok()?;
    file.get("routes")?.as_array()?.get(starts.checked_sub(1)?).cloned()
}

/// A problem as an editor diagnostic: positions become 0-based; one with no place marks the file's start.
fn diagnostic(p: &Problem) -> Diagnostic {
    let line = p.line.saturating_sub(1) as u32;
    let character = p.column.saturating_sub(1) as u32;
    Diagnostic {
        range: Range {
            start: Position { line, character },
            end: Position {
                line,
                character: character + 1,
            },
        },
        severity: Some(match p.severity {
            Severity::Error => DiagnosticSeverity::ERROR,
            Severity::Warning => DiagnosticSeverity::WARNING,
        }),
        source: Some("switchyard".into()),
        message: p.message.clone(),
        ..Diagnostic::default()
    }
}

/// The path of a `file://` URI (percent-escapes decoded).
fn path_of(uri: &Uri) -> Option<PathBuf> {
    let rest = uri.as_str().strip_prefix("file://")?;
    let mut bytes = Vec::with_capacity(rest.len());
    let raw = rest.as_bytes();
    let mut i = 0;
    while i < raw.len() {
        if raw[i] == b'%'
            && let Some(b) = rest.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(h, 16).ok())
        {
            bytes.push(b);
            i += 3;
            continue;
        }
        bytes.push(raw[i]);
        i += 1;
    }
    Some(PathBuf::from(String::from_utf8(bytes).ok()?))
}

fn same_file(a: &Path, b: &Path) -> bool {
    a == b || matches!((a.canonicalize(), b.canonicalize()), (Ok(x), Ok(y)) if x == y)
}

/// `schemas/avro` in the file's folder or one above it (the project's Avro schemas), for the field checks.
fn schemas_above(path: &Path) -> Option<PathBuf> {
    path.ancestors()
        .skip(1)
        .map(|dir| dir.join("schemas/avro"))
        .find(|dir| dir.is_dir())
}
