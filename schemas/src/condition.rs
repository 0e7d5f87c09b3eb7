//! Conditions on outcome definitions: the `when` of an `[[outcomes]]` entry
//! (`docs/metering-config.md`, `docs/adr/0005-derived-outcomes.md` section 2).
//!
//! * [`Condition`] is the file format: a node is either `all` / `any` (a list of conditions),
//!   `not` (one condition), or a comparison `{ field = "...", <operator> = <literal> }` with
//!   exactly one of `eq`, `ne`, `lt`, `le`, `gt`, `ge`, `in`, `exists`, `matches`. Unknown keys
//!   (a misspelt operator) are refused when the file is read.
//! * [`Condition::compile`] type-checks a condition and lists *every* problem; what it returns,
//!   [`CompiledCondition`], is built once per snapshot and evaluated per action with
//!   [`CompiledCondition::holds`].
//!
//! Type rules: a field is text (`user_id`, `llm_model`, …), decimal (`input_tokens`,
//! `reported_cost`, …) or an attribute (`attributes.<key>`, typed by its value in each action).
//! Decimal literals are quoted decimal strings (`"0.9"`), compared exactly (never as floats). An
//! attribute compares numerically when the literal is a decimal and the value a JSON number or a
//! numeric string; as text when the literal is any other string and the value a string; as a
//! boolean when the literal is a boolean and the value a JSON boolean. Anything else — a missing
//! field, a `null`, a value of another type, a number beyond the decimal range, attributes that
//! are not a JSON object — makes the comparison false (and `exists = false` true).
//!
//! Evaluation allocates nothing in the common case: the attributes are scanned once, only for
//! the keys the condition names, and their values are borrowed from the action's JSON text.

use std::borrow::Cow;
use std::cmp::Ordering;
use std::fmt;

use regex::{Regex, RegexBuilder};
use rust_decimal::Decimal;
use serde::de::{self, DeserializeSeed, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::value::RawValue;

use crate::action::RawAction;

/// Deepest nesting of `all` / `any` / `not` accepted (a comparison at the top is depth 1).
pub const MAX_CONDITION_DEPTH: usize = 8;
/// Most comparisons in one condition.
pub const MAX_CONDITION_COMPARISONS: usize = 64;
/// Most entries of one `in` list.
pub const MAX_IN_LIST: usize = 1_000;
/// Limit on the compiled size of one regex and on its lazy DFA (`RegexBuilder::size_limit`,
/// `dfa_size_limit`): no pattern can make compilation or matching explode.
pub const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// Longest regex pattern accepted, in bytes.
pub const MAX_REGEX_BYTES: usize = 1_024;

/// The prefix of attribute fields: `attributes.<key>` names the top-level attribute `<key>`.
pub const ATTRIBUTE_PREFIX: &str = "attributes.";

/// One node of a condition tree, as written in the configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Condition {
    /// Holds when every listed condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub all: Option<Vec<Condition>>,
    /// Holds when at least one listed condition holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub any: Option<Vec<Condition>>,
    /// Holds when the condition does not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub not: Option<Box<Condition>>,
    /// The compared field: an action field (`llm_model`) or `attributes.<key>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eq: Option<Literal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ne: Option<Literal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lt: Option<Literal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub le: Option<Literal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gt: Option<Literal>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ge: Option<Literal>,
    #[serde(default, rename = "in", skip_serializing_if = "Option::is_none")]
    pub in_list: Option<Vec<Literal>>,
    /// `true`: the field is present (and not `null`); `false`: it is missing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exists: Option<bool>,
    /// A regex (`regex` crate syntax) the text value must match somewhere; anchor it with
    /// `^…$` to match the whole value.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matches: Option<String>,
}

/// A literal of a comparison: a quoted string (a decimal when it reads as one) or a boolean.
/// Bare TOML / JSON numbers are refused: they would already be rounded to binary.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(untagged)]
pub enum Literal {
    Text(String),
    Bool(bool),
}

impl<'de> Deserialize<'de> for Literal {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Literal, D::Error> {
        struct LiteralVisitor;
        const NUMBER: &str = "numbers in a condition must be quoted decimal strings such as \"0.9\", never bare numbers";
        impl<'de> Visitor<'de> for LiteralVisitor {
            type Value = Literal;
            fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
                formatter.write_str("a quoted string (\"success\", \"0.9\") or a boolean")
            }
            fn visit_str<E: de::Error>(self, value: &str) -> Result<Literal, E> {
                Ok(Literal::Text(value.to_string()))
            }
            fn visit_string<E: de::Error>(self, value: String) -> Result<Literal, E> {
                Ok(Literal::Text(value))
            }
            fn visit_bool<E: de::Error>(self, value: bool) -> Result<Literal, E> {
                Ok(Literal::Bool(value))
            }
            fn visit_i64<E: de::Error>(self, _: i64) -> Result<Literal, E> {
                Err(E::custom(NUMBER))
            }
            fn visit_u64<E: de::Error>(self, _: u64) -> Result<Literal, E> {
                Err(E::custom(NUMBER))
            }
            fn visit_f64<E: de::Error>(self, _: f64) -> Result<Literal, E> {
                Err(E::custom(NUMBER))
            }
        }
        deserializer.deserialize_any(LiteralVisitor)
    }
}

impl fmt::Display for Literal {
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Literal::Text(text) => write!(formatter, "{text:?}"),
            Literal::Bool(value) => write!(formatter, "{value}"),
        }
    }
}

/// A text field of [`RawAction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum TextField {
    EventId,
    AccountId,
    AgentInstanceId,
    Kind,
    ActionName,
    TraceEvent,
    UserId,
    AnonymousId,
    Description,
    LlmProvider,
    LlmModel,
    Source,
}

/// A decimal field of [`RawAction`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum DecimalField {
    InputTokens,
    OutputTokens,
    TotalTokens,
    ReportedCost,
}

const TEXT_FIELDS: [(&str, TextField); 12] = [
    ("event_id", TextField::EventId),
    ("account_id", TextField::AccountId),
    ("agent_instance_id", TextField::AgentInstanceId),
    ("kind", TextField::Kind),
    ("action_name", TextField::ActionName),
    ("trace_event", TextField::TraceEvent),
    ("user_id", TextField::UserId),
    ("anonymous_id", TextField::AnonymousId),
    ("description", TextField::Description),
    ("llm_provider", TextField::LlmProvider),
    ("llm_model", TextField::LlmModel),
    ("source", TextField::Source),
];

const DECIMAL_FIELDS: [(&str, DecimalField); 4] = [
    ("input_tokens", DecimalField::InputTokens),
    ("output_tokens", DecimalField::OutputTokens),
    ("total_tokens", DecimalField::TotalTokens),
    ("reported_cost", DecimalField::ReportedCost),
];

impl TextField {
    fn of(self, raw: &RawAction) -> Option<&str> {
        match self {
            TextField::EventId => Some(&raw.event_id),
            TextField::AccountId => Some(&raw.account_id),
            TextField::AgentInstanceId => Some(&raw.agent_instance_id),
            TextField::Kind => Some(raw.kind.as_str()),
            TextField::ActionName => Some(&raw.action_name),
            TextField::TraceEvent => raw.trace_event.as_deref(),
            TextField::UserId => raw.user_id.as_deref(),
            TextField::AnonymousId => raw.anonymous_id.as_deref(),
            TextField::Description => raw.description.as_deref(),
            TextField::LlmProvider => raw.llm_provider.as_deref(),
            TextField::LlmModel => raw.llm_model.as_deref(),
            TextField::Source => Some(&raw.source),
        }
    }
}

impl DecimalField {
    fn of(self, raw: &RawAction) -> Option<Decimal> {
        match self {
            DecimalField::InputTokens => raw.input_tokens.map(Decimal::from),
            DecimalField::OutputTokens => raw.output_tokens.map(Decimal::from),
            DecimalField::TotalTokens => raw.total_tokens.map(Decimal::from),
            DecimalField::ReportedCost => raw.reported_cost,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Field {
    Text(TextField),
    Decimal(DecimalField),
    /// Index into [`CompiledCondition::attribute_keys`].
    Attribute(usize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Eq,
    Ne,
    Lt,
    Le,
    Gt,
    Ge,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Eq => "eq",
            Op::Ne => "ne",
            Op::Lt => "lt",
            Op::Le => "le",
            Op::Gt => "gt",
            Op::Ge => "ge",
        }
    }

    fn holds(self, ordering: Ordering) -> bool {
        match self {
            Op::Eq => ordering == Ordering::Equal,
            Op::Ne => ordering != Ordering::Equal,
            Op::Lt => ordering == Ordering::Less,
            Op::Le => ordering != Ordering::Greater,
            Op::Gt => ordering == Ordering::Greater,
            Op::Ge => ordering != Ordering::Less,
        }
    }
}

#[derive(Debug, Clone)]
enum Test {
    Exists(bool),
    /// `eq` / `ne` on text.
    Text(Op, Box<str>),
    /// Sorted.
    TextIn(Box<[Box<str>]>),
    Matches(Regex),
    Decimal(Op, Decimal),
    /// Sorted.
    DecimalIn(Box<[Decimal]>),
    /// `eq` / `ne` on a boolean.
    Bool(Op, bool),
    BoolIn {
        r#true: bool,
        r#false: bool,
    },
}

#[derive(Debug, Clone)]
enum Node {
    All(Box<[Node]>),
    Any(Box<[Node]>),
    Not(Box<Node>),
    Compare(Field, Test),
}

/// A type-checked condition with its regexes compiled, ready to evaluate.
#[derive(Debug, Clone)]
pub struct CompiledCondition {
    source: Condition,
    root: Node,
    /// The attribute keys the condition names, sorted and distinct; at most
    /// [`MAX_CONDITION_COMPARISONS`].
    attribute_keys: Box<[Box<str>]>,
}

/// Two compiled conditions are equal when they were compiled from equal conditions.
impl PartialEq for CompiledCondition {
    fn eq(&self, other: &CompiledCondition) -> bool {
        self.source == other.source
    }
}

impl CompiledCondition {
    /// The condition this was compiled from.
    pub fn source(&self) -> &Condition {
        &self.source
    }

    /// Whether the condition holds for `raw`. Never panics, whatever the action carries.
    pub fn holds(&self, raw: &RawAction) -> bool {
        if self.attribute_keys.is_empty() {
            return eval(&self.root, raw, &[]);
        }
        // On the stack: one slot per named attribute, borrowing from the action's JSON text.
        let mut slots: [Option<&RawValue>; MAX_CONDITION_COMPARISONS] =
            [None; MAX_CONDITION_COMPARISONS];
        let slots = &mut slots[..self.attribute_keys.len().min(MAX_CONDITION_COMPARISONS)];
        scan_attributes(&raw.attributes_json, &self.attribute_keys, slots);
        eval(&self.root, raw, slots)
    }
}

fn eval(node: &Node, raw: &RawAction, attributes: &[Option<&RawValue>]) -> bool {
    match node {
        Node::All(nodes) => nodes.iter().all(|node| eval(node, raw, attributes)),
        Node::Any(nodes) => nodes.iter().any(|node| eval(node, raw, attributes)),
        Node::Not(node) => !eval(node, raw, attributes),
        Node::Compare(field, test) => {
            let value = match *field {
                Field::Text(field) => field.of(raw).map(Value::Text),
                Field::Decimal(field) => field.of(raw).map(Value::Decimal),
                Field::Attribute(index) => attributes
                    .get(index)
                    .copied()
                    .flatten()
                    .filter(|value| value.get() != "null")
                    .map(Value::Json),
            };
            test.holds(value)
        }
    }
}

/// A present field value.
enum Value<'a> {
    Text(&'a str),
    Decimal(Decimal),
    /// An attribute's JSON text (not `null`).
    Json(&'a RawValue),
}

impl Value<'_> {
    fn text(&self) -> Option<Cow<'_, str>> {
        match self {
            Value::Text(text) => Some(Cow::Borrowed(text)),
            Value::Decimal(_) => None,
            Value::Json(json) => json_string(json.get()),
        }
    }

    fn decimal(&self) -> Option<Decimal> {
        match self {
            Value::Text(_) => None,
            Value::Decimal(value) => Some(*value),
            Value::Json(json) => {
                let text = json.get();
                match text.as_bytes().first()? {
                    b'"' => exact_decimal(json_string(text)?.trim(), false),
                    b'-' | b'0'..=b'9' => exact_decimal(text, true),
                    _ => None,
                }
            }
        }
    }

    fn boolean(&self) -> Option<bool> {
        match self {
            Value::Json(json) => match json.get() {
                "true" => Some(true),
                "false" => Some(false),
                _ => None,
            },
            _ => None,
        }
    }
}

impl Test {
    fn holds(&self, value: Option<Value<'_>>) -> bool {
        let Some(value) = value else {
            return matches!(self, Test::Exists(false));
        };
        match self {
            Test::Exists(wanted) => *wanted,
            Test::Text(op, literal) => value
                .text()
                .is_some_and(|text| op.holds(text.as_ref().cmp(literal))),
            Test::TextIn(list) => value.text().is_some_and(|text| {
                list.binary_search_by(|entry| entry.as_ref().cmp(text.as_ref()))
                    .is_ok()
            }),
            Test::Matches(regex) => value.text().is_some_and(|text| regex.is_match(&text)),
            Test::Decimal(op, literal) => value
                .decimal()
                .is_some_and(|decimal| op.holds(decimal.cmp(literal))),
            Test::DecimalIn(list) => value
                .decimal()
                .is_some_and(|decimal| list.binary_search(&decimal).is_ok()),
            Test::Bool(op, literal) => value
                .boolean()
                .is_some_and(|boolean| op.holds(boolean.cmp(literal))),
            Test::BoolIn { r#true, r#false } => {
                value
                    .boolean()
                    .is_some_and(|boolean| if boolean { *r#true } else { *r#false })
            }
        }
    }
}

/// The string a JSON string literal holds: borrowed unless it has escapes. `None` for any other
/// JSON value.
fn json_string(json: &str) -> Option<Cow<'_, str>> {
    if !json.starts_with('"') {
        return None;
    }
    struct CowVisitor;
    impl<'de> Visitor<'de> for CowVisitor {
        type Value = Cow<'de, str>;
        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            formatter.write_str("a string")
        }
        fn visit_borrowed_str<E: de::Error>(self, value: &'de str) -> Result<Self::Value, E> {
            Ok(Cow::Borrowed(value))
        }
        fn visit_str<E: de::Error>(self, value: &str) -> Result<Self::Value, E> {
            Ok(Cow::Owned(value.to_string()))
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(json);
    deserializer.deserialize_str(CowVisitor).ok()
}

/// Fills `slots[i]` with the value of top-level attribute `keys[i]` (the last one when a key is
/// repeated, as `serde_json::Value` would). Attributes that are not one JSON object leave every
/// slot empty.
fn scan_attributes<'a>(json: &'a str, keys: &[Box<str>], slots: &mut [Option<&'a RawValue>]) {
    struct Scan<'k, 's, 'a> {
        keys: &'k [Box<str>],
        slots: &'s mut [Option<&'a RawValue>],
    }
    impl<'de, 'k, 's> DeserializeSeed<'de> for Scan<'k, 's, 'de> {
        type Value = ();
        fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
            deserializer.deserialize_map(self)
        }
    }
    impl<'de, 'k, 's> Visitor<'de> for Scan<'k, 's, 'de> {
        type Value = ();
        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            formatter.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
            while let Some(index) = map.next_key_seed(Key(self.keys))? {
                match index.and_then(|index| self.slots.get_mut(index)) {
                    Some(slot) => *slot = Some(map.next_value::<&'de RawValue>()?),
                    None => {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
            }
            Ok(())
        }
    }
    /// A key, looked up without being copied.
    struct Key<'k>(&'k [Box<str>]);
    impl<'de> DeserializeSeed<'de> for Key<'_> {
        type Value = Option<usize>;
        fn deserialize<D: Deserializer<'de>>(
            self,
            deserializer: D,
        ) -> Result<Self::Value, D::Error> {
            deserializer.deserialize_str(self)
        }
    }
    impl<'de> Visitor<'de> for Key<'_> {
        type Value = Option<usize>;
        fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
            formatter.write_str("a key")
        }
        fn visit_str<E: de::Error>(self, key: &str) -> Result<Option<usize>, E> {
            Ok(self
                .0
                .binary_search_by(|entry| entry.as_ref().cmp(key))
                .ok())
        }
    }

    let mut deserializer = serde_json::Deserializer::from_str(json);
    let scanned = Scan {
        keys,
        slots: &mut *slots,
    }
    .deserialize(&mut deserializer)
    .and_then(|()| deserializer.end());
    if scanned.is_err() {
        slots.fill(None);
    }
}

/// The exact decimal `text` denotes, or `None` when it is no number or one beyond the range of
/// [`Decimal`] (more than 28 significant digits or 28 fractional digits): never a rounding.
/// Syntax: `-?[0-9]+(\.[0-9]+)?`, and with `exponent` a JSON number's `([eE][+-]?[0-9]+)?`.
pub fn exact_decimal(text: &str, exponent: bool) -> Option<Decimal> {
    const MAX_DIGITS: u64 = 28;
    fn digits(bytes: &[u8]) -> usize {
        bytes
            .iter()
            .take_while(|byte| byte.is_ascii_digit())
            .count()
    }
    let bytes = text.as_bytes();
    let (negative, rest) = match bytes.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, bytes),
    };
    let (integer, rest) = rest.split_at(digits(rest));
    if integer.is_empty() {
        return None;
    }
    let (fraction, rest) = match rest.split_first() {
        Some((b'.', after)) => {
            let (fraction, rest) = after.split_at(digits(after));
            if fraction.is_empty() {
                return None;
            }
            (fraction, rest)
        }
        _ => (&[][..], rest),
    };
    let power_of_ten: i64 = match rest.split_first() {
        None => 0,
        Some((b'e' | b'E', after)) if exponent => {
            let (negative_exponent, after) = match after.split_first() {
                Some((b'-', after)) => (true, after),
                Some((b'+', after)) => (false, after),
                _ => (false, after),
            };
            if after.is_empty() || digits(after) != after.len() {
                return None;
            }
            let significant = &after[after.iter().take_while(|&&b| b == b'0').count()..];
            if significant.len() > 9 {
                return None;
            }
            let magnitude = significant
                .iter()
                .fold(0i64, |value, byte| value * 10 + i64::from(byte - b'0'));
            if negative_exponent {
                -magnitude
            } else {
                magnitude
            }
        }
        _ => return None,
    };
    let all = || integer.iter().chain(fraction.iter());
    let total = integer.len() + fraction.len();
    let leading = all().take_while(|&&byte| byte == b'0').count();
    if leading == total {
        return Some(Decimal::ZERO);
    }
    let trailing = fraction
        .iter()
        .rev()
        .chain(integer.iter().rev())
        .take_while(|&&byte| byte == b'0')
        .count();
    let significant = u64::try_from(total - leading - trailing).ok()?;
    // value = significant digits × 10^power
    let power = power_of_ten
        .checked_sub(i64::try_from(fraction.len()).ok()?)?
        .checked_add(i64::try_from(trailing).ok()?)?;
    let (appended_zeros, scale) = if power >= 0 {
        (power.unsigned_abs(), 0)
    } else {
        (0, power.unsigned_abs())
    };
    if scale > MAX_DIGITS || significant.checked_add(appended_zeros)? > MAX_DIGITS {
        return None;
    }
    let mut mantissa = all()
        .skip(leading)
        .take(significant as usize)
        .fold(0i128, |value, byte| value * 10 + i128::from(byte - b'0'));
    for _ in 0..appended_zeros {
        mantissa *= 10;
    }
    if negative {
        mantissa = -mantissa;
    }
    Decimal::try_from_i128_with_scale(mantissa, scale as u32).ok()
}

/// The type of a field, as far as the configuration knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FieldType {
    Text,
    Decimal,
    /// Typed by its value in each action.
    Attribute,
}

/// The type a literal has against an attribute.
#[derive(Debug, Clone, PartialEq)]
enum Typed {
    Text(String),
    Decimal(Decimal),
    Bool(bool),
}

impl Typed {
    fn kind(&self) -> &'static str {
        match self {
            Typed::Text(_) => "text",
            Typed::Decimal(_) => "decimal",
            Typed::Bool(_) => "boolean",
        }
    }
}

fn field_names() -> String {
    TEXT_FIELDS
        .iter()
        .map(|(name, _)| *name)
        .chain(DECIMAL_FIELDS.iter().map(|(name, _)| *name))
        .collect::<Vec<_>>()
        .join(", ")
}

struct Compiler {
    problems: Vec<String>,
    comparisons: usize,
    too_deep: bool,
    attribute_keys: Vec<String>,
}

impl Condition {
    /// Type-checks this condition and compiles it; `Err` lists every problem, each prefixed by
    /// `context` and the path of the node (`when.all[2].any[0]`).
    pub fn compile(&self, context: &str) -> Result<CompiledCondition, Vec<String>> {
        let mut compiler = Compiler {
            problems: Vec::new(),
            comparisons: 0,
            too_deep: false,
            attribute_keys: Vec::new(),
        };
        // First pass: the attribute keys, so that fields can name their sorted index.
        collect_attribute_keys(self, 1, &mut compiler.attribute_keys);
        compiler.attribute_keys.sort();
        compiler.attribute_keys.dedup();
        let root = compiler.node(self, &format!("{context}: when"), 1);
        let mut problems = compiler.problems;
        if compiler.comparisons > MAX_CONDITION_COMPARISONS {
            problems.push(format!(
                "{context}: when has {} comparisons; at most {MAX_CONDITION_COMPARISONS} are accepted (split the outcome or simplify the condition)",
                compiler.comparisons
            ));
        }
        let attribute_keys = compiler
            .attribute_keys
            .into_iter()
            .map(String::into_boxed_str)
            .collect();
        match root {
            Some(root) if problems.is_empty() => Ok(CompiledCondition {
                source: self.clone(),
                root,
                attribute_keys,
            }),
            _ => Err(problems),
        }
    }
}

fn collect_attribute_keys(condition: &Condition, depth: usize, keys: &mut Vec<String>) {
    if depth > MAX_CONDITION_DEPTH {
        return;
    }
    if let Some(key) = condition
        .field
        .as_deref()
        .and_then(|field| field.strip_prefix(ATTRIBUTE_PREFIX))
    {
        keys.push(key.to_string());
    }
    for child in condition.all.iter().chain(condition.any.iter()).flatten() {
        collect_attribute_keys(child, depth + 1, keys);
    }
    if let Some(child) = &condition.not {
        collect_attribute_keys(child, depth + 1, keys);
    }
}

impl Compiler {
    fn problem(&mut self, path: &str, text: impl fmt::Display) {
        self.problems.push(format!("{path}: {text}"));
    }

    fn node(&mut self, condition: &Condition, path: &str, depth: usize) -> Option<Node> {
        if depth > MAX_CONDITION_DEPTH {
            if !self.too_deep {
                self.too_deep = true;
                self.problem(
                    path,
                    format!("conditions nest deeper than {MAX_CONDITION_DEPTH} levels of all / any / not; flatten it"),
                );
            }
            return None;
        }
        let operators = condition.operators();
        let groups = [
            ("all", condition.all.is_some()),
            ("any", condition.any.is_some()),
            ("not", condition.not.is_some()),
        ];
        let group_names: Vec<&str> = groups
            .iter()
            .filter(|(_, present)| *present)
            .map(|(name, _)| *name)
            .collect();
        if !group_names.is_empty() {
            if group_names.len() > 1 || condition.field.is_some() || !operators.is_empty() {
                let mut keys = group_names.clone();
                keys.extend(condition.field.as_ref().map(|_| "field"));
                keys.extend(operators.iter().map(|(name, _)| *name));
                self.problem(
                    path,
                    format!(
                        "a condition is one of `all`, `any`, `not` or a comparison (`field` with one operator), but this one has {}; split it into an `all` list",
                        keys.join(", ")
                    ),
                );
                return None;
            }
            return match group_names[0] {
                "not" => {
                    let child = condition.not.as_deref()?;
                    let child = self.node(child, &format!("{path}.not"), depth + 1)?;
                    Some(Node::Not(Box::new(child)))
                }
                group => {
                    let children = if group == "all" {
                        condition.all.as_deref()?
                    } else {
                        condition.any.as_deref()?
                    };
                    if children.is_empty() {
                        self.problem(
                            path,
                            format!("`{group}` is an empty list; give it at least one condition or remove it"),
                        );
                        return None;
                    }
                    let mut nodes = Vec::with_capacity(children.len());
                    for (index, child) in children.iter().enumerate() {
                        nodes.push(self.node(
                            child,
                            &format!("{path}.{group}[{index}]"),
                            depth + 1,
                        ));
                    }
                    let nodes: Option<Vec<Node>> = nodes.into_iter().collect();
                    let nodes = nodes?.into_boxed_slice();
                    Some(if group == "all" {
                        Node::All(nodes)
                    } else {
                        Node::Any(nodes)
                    })
                }
            };
        }

        self.comparisons += 1;
        let Some(field_name) = condition.field.as_deref() else {
            self.problem(
                path,
                "a comparison needs `field` (e.g. { field = \"attributes.status\", eq = \"success\" }); or use `all`, `any` or `not`",
            );
            return None;
        };
        let field = self.field(field_name, path);
        let operator = match operators.as_slice() {
            [operator] => Some(*operator),
            [] => {
                self.problem(
                    path,
                    format!("the comparison on {field_name:?} has no operator; add one of eq, ne, lt, le, gt, ge, in, exists, matches"),
                );
                None
            }
            several => {
                let names: Vec<&str> = several.iter().map(|(name, _)| *name).collect();
                self.problem(
                    path,
                    format!(
                        "the comparison on {field_name:?} has several operators ({}); a comparison has exactly one (combine comparisons with `all`)",
                        names.join(", ")
                    ),
                );
                None
            }
        };
        let (field, (operator, operand)) = (field?, operator?);
        let field_type = match field {
            Field::Text(_) => FieldType::Text,
            Field::Decimal(_) => FieldType::Decimal,
            Field::Attribute(_) => FieldType::Attribute,
        };
        let test = self.test(field_name, field_type, operator, operand, path)?;
        Some(Node::Compare(field, test))
    }

    fn field(&mut self, name: &str, path: &str) -> Option<Field> {
        if let Some(key) = name.strip_prefix(ATTRIBUTE_PREFIX) {
            if key.is_empty() {
                self.problem(
                    path,
                    "field \"attributes.\" names no attribute; write attributes.<key>, e.g. attributes.status",
                );
                return None;
            }
            return self
                .attribute_keys
                .binary_search_by(|entry| entry.as_str().cmp(key))
                .ok()
                .map(Field::Attribute);
        }
        if let Some((_, field)) = TEXT_FIELDS.iter().find(|(known, _)| *known == name) {
            return Some(Field::Text(*field));
        }
        if let Some((_, field)) = DECIMAL_FIELDS.iter().find(|(known, _)| *known == name) {
            return Some(Field::Decimal(*field));
        }
        let hint = if name == "attributes" {
            "write attributes.<key>, e.g. attributes.status".to_string()
        } else {
            format!(
                "the fields of an action are {}; attributes are written attributes.<key> (e.g. attributes.{name})",
                field_names()
            )
        };
        self.problem(path, format!("unknown field {name:?}: {hint}"));
        None
    }

    fn test(
        &mut self,
        field: &str,
        field_type: FieldType,
        operator: &str,
        operand: Operand<'_>,
        path: &str,
    ) -> Option<Test> {
        match operand {
            Operand::Exists(wanted) => Some(Test::Exists(wanted)),
            Operand::Matches(pattern) => {
                if field_type == FieldType::Decimal {
                    self.problem(
                        path,
                        format!("`matches` applies to text, but {field:?} is a decimal field; compare it with eq, lt, ge, …"),
                    );
                    return None;
                }
                if pattern.len() > MAX_REGEX_BYTES {
                    self.problem(
                        path,
                        format!("the regex of `matches` on {field:?} is {} bytes long; at most {MAX_REGEX_BYTES} are accepted", pattern.len()),
                    );
                    return None;
                }
                match RegexBuilder::new(pattern)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .build()
                {
                    Ok(regex) => Some(Test::Matches(regex)),
                    Err(error) => {
                        let error = error.to_string().replace('\n', " ");
                        self.problem(
                            path,
                            format!("the regex {pattern:?} of `matches` on {field:?} does not compile: {error}"),
                        );
                        None
                    }
                }
            }
            Operand::Compare(op, literal) => {
                let typed = self.typed(field, field_type, operator, literal, path)?;
                if matches!(op, Op::Lt | Op::Le | Op::Gt | Op::Ge) {
                    return match typed {
                        Typed::Decimal(value) => Some(Test::Decimal(op, value)),
                        other => {
                            let why = if field_type == FieldType::Text {
                                format!("{field:?} is a text field; text takes eq, ne, in, matches or exists")
                            } else {
                                format!("its literal {literal} is {}; write a quoted decimal such as \"0.9\"", other.kind())
                            };
                            self.problem(
                                path,
                                format!("`{}` compares decimals, but {why}", op.name()),
                            );
                            None
                        }
                    };
                }
                Some(match typed {
                    Typed::Text(text) => Test::Text(op, text.into_boxed_str()),
                    Typed::Decimal(value) => Test::Decimal(op, value),
                    Typed::Bool(value) => Test::Bool(op, value),
                })
            }
            Operand::In(list) => {
                if list.is_empty() {
                    self.problem(
                        path,
                        format!("`in` on {field:?} is an empty list, which nothing is in; list at least one value"),
                    );
                    return None;
                }
                if list.len() > MAX_IN_LIST {
                    self.problem(
                        path,
                        format!(
                            "`in` on {field:?} lists {} values; at most {MAX_IN_LIST} are accepted",
                            list.len()
                        ),
                    );
                    return None;
                }
                let mut typed = Vec::with_capacity(list.len());
                for literal in list {
                    typed.push(self.typed(field, field_type, "in", literal, path));
                }
                let typed: Vec<Typed> = typed.into_iter().collect::<Option<_>>()?;
                let kinds: Vec<&str> = {
                    let mut kinds: Vec<&str> = typed.iter().map(Typed::kind).collect();
                    kinds.sort();
                    kinds.dedup();
                    kinds
                };
                if kinds.len() > 1 {
                    self.problem(
                        path,
                        format!(
                            "`in` on {field:?} mixes {} values; list values of one type (a string that reads as a decimal, like \"2\", is a decimal: use `matches` or several `eq` in an `any` to compare such text)",
                            kinds.join(" and ")
                        ),
                    );
                    return None;
                }
                Some(match typed[0] {
                    Typed::Text(_) => {
                        let mut texts: Vec<Box<str>> = typed
                            .into_iter()
                            .filter_map(|typed| match typed {
                                Typed::Text(text) => Some(text.into_boxed_str()),
                                _ => None,
                            })
                            .collect();
                        texts.sort();
                        texts.dedup();
                        Test::TextIn(texts.into_boxed_slice())
                    }
                    Typed::Decimal(_) => {
                        let mut decimals: Vec<Decimal> = typed
                            .into_iter()
                            .filter_map(|typed| match typed {
                                Typed::Decimal(value) => Some(value),
                                _ => None,
                            })
                            .collect();
                        decimals.sort();
                        decimals.dedup();
                        Test::DecimalIn(decimals.into_boxed_slice())
                    }
                    Typed::Bool(_) => Test::BoolIn {
                        r#true: typed.contains(&Typed::Bool(true)),
                        r#false: typed.contains(&Typed::Bool(false)),
                    },
                })
            }
        }
    }

    /// The literal typed against the field: text for text fields, a decimal for decimal fields,
    /// and for attributes a decimal when it reads as one, else text or a boolean.
    fn typed(
        &mut self,
        field: &str,
        field_type: FieldType,
        operator: &str,
        literal: &Literal,
        path: &str,
    ) -> Option<Typed> {
        match (field_type, literal) {
            (FieldType::Text, Literal::Text(text)) => Some(Typed::Text(text.clone())),
            (FieldType::Text, Literal::Bool(_)) => {
                self.problem(
                    path,
                    format!("`{operator}` on {field:?} has the boolean {literal}, but {field:?} is a text field; quote the value"),
                );
                None
            }
            (FieldType::Decimal, Literal::Text(text)) => match exact_decimal(text, false) {
                Some(value) => Some(Typed::Decimal(value)),
                None => {
                    self.problem(
                        path,
                        format!("`{operator}` on the decimal field {field:?} has {literal}, which is not a decimal; write a quoted decimal such as \"100\" or \"0.9\" (at most 28 digits)"),
                    );
                    None
                }
            },
            (FieldType::Decimal, Literal::Bool(_)) => {
                self.problem(
                    path,
                    format!("`{operator}` on the decimal field {field:?} has the boolean {literal}; write a quoted decimal such as \"100\""),
                );
                None
            }
            (FieldType::Attribute, Literal::Bool(value)) => Some(Typed::Bool(*value)),
            (FieldType::Attribute, Literal::Text(text)) => Some(match exact_decimal(text, false) {
                Some(value) => Typed::Decimal(value),
                None => Typed::Text(text.clone()),
            }),
        }
    }
}

/// What a comparison compares with.
#[derive(Clone, Copy)]
enum Operand<'a> {
    Compare(Op, &'a Literal),
    In(&'a [Literal]),
    Exists(bool),
    Matches(&'a str),
}

impl Condition {
    /// The operators present in this node, by name.
    fn operators(&self) -> Vec<(&'static str, Operand<'_>)> {
        let mut operators = Vec::new();
        for (op, literal) in [
            (Op::Eq, &self.eq),
            (Op::Ne, &self.ne),
            (Op::Lt, &self.lt),
            (Op::Le, &self.le),
            (Op::Gt, &self.gt),
            (Op::Ge, &self.ge),
        ] {
            if let Some(literal) = literal {
                operators.push((op.name(), Operand::Compare(op, literal)));
            }
        }
        if let Some(list) = &self.in_list {
            operators.push(("in", Operand::In(list)));
        }
        if let Some(wanted) = self.exists {
            operators.push(("exists", Operand::Exists(wanted)));
        }
        if let Some(pattern) = &self.matches {
            operators.push(("matches", Operand::Matches(pattern)));
        }
        operators
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn condition(json: &str) -> Condition {
        serde_json::from_str(json).unwrap_or_else(|error| panic!("{json}: {error}"))
    }

    fn compiled(json: &str) -> CompiledCondition {
        condition(json)
            .compile("outcome \"o\"")
            .unwrap_or_else(|problems| panic!("{json}: {problems:#?}"))
    }

    fn problems(json: &str) -> Vec<String> {
        condition(json).compile("outcome \"o\"").unwrap_err()
    }

    fn action(attributes: &str) -> RawAction {
        RawAction {
            attributes_json: attributes.into(),
            ..RawAction::minimal("ws", "acc", "inst", "e1", "object_detection")
        }
    }

    /// Whether `{field, op: literal}` (JSON) holds for an action with these attributes.
    fn holds(test: &str, attributes: &str) -> bool {
        compiled(test).holds(&action(attributes))
    }

    #[test]
    fn eq_and_ne_compare_text_as_text() {
        let eq = r#"{"field": "attributes.status", "eq": "success"}"#;
        let ne = r#"{"field": "attributes.status", "ne": "success"}"#;
        assert!(holds(eq, r#"{"status":"success"}"#));
        assert!(!holds(eq, r#"{"status":"Success"}"#));
        assert!(!holds(ne, r#"{"status":"success"}"#));
        assert!(holds(ne, r#"{"status":"failed"}"#));
        // Escapes are decoded; the last of repeated keys counts, as serde_json::Value has it.
        assert!(holds(eq, r#"{"status":"succ\u0065ss"}"#));
        assert!(holds(eq, r#"{"st\u0061tus":"success"}"#));
        assert!(holds(eq, r#"{"status":"failed","status":"success"}"#));
        // Another type, a null or a missing attribute: both eq and ne are false.
        for attributes in [
            r#"{"status":1}"#,
            r#"{"status":true}"#,
            r#"{"status":null}"#,
            r#"{"status":["success"]}"#,
            r#"{"state":"success"}"#,
            "{}",
            "[]",
            "not json",
            "",
        ] {
            assert!(!holds(eq, attributes), "{attributes}");
            assert!(!holds(ne, attributes), "{attributes}");
        }
        // Typed text fields: a decimal-looking literal is still text there.
        let user = r#"{"field": "user_id", "eq": "007"}"#;
        let mut with_user = action("{}");
        assert!(!compiled(user).holds(&with_user), "missing user");
        with_user.user_id = Some("007".into());
        assert!(compiled(user).holds(&with_user));
        with_user.user_id = Some("7".into());
        assert!(!compiled(user).holds(&with_user));
        assert!(
            compiled(r#"{"field": "action_name", "eq": "object_detection"}"#).holds(&with_user)
        );
        assert!(compiled(r#"{"field": "kind", "eq": "action"}"#).holds(&with_user));
        assert!(compiled(r#"{"field": "source", "ne": "rest"}"#).holds(&with_user));
    }

    #[test]
    fn decimals_compare_exactly_whether_number_or_numeric_text() {
        let ge = r#"{"field": "attributes.score", "ge": "0.9"}"#;
        for (attributes, expected) in [
            (r#"{"score":0.9}"#, true),
            (r#"{"score":0.90000}"#, true),
            (r#"{"score":"0.9"}"#, true),
            (r#"{"score":" 0.95 "}"#, true),
            (r#"{"score":9e-1}"#, true),
            (r#"{"score":1}"#, true),
            (r#"{"score":0.8999999999999999999999999999}"#, false),
            // 29 fractional digits: beyond the decimal range, so false (never rounded to 0.9).
            (r#"{"score":0.89999999999999999999999999999}"#, false),
            (r#"{"score":0.90000000000000000000000000001}"#, false),
            (r#"{"score":1e400}"#, false),
            (r#"{"score":123456789012345678901234567890}"#, false),
            (r#"{"score":"1e3"}"#, false),
            (r#"{"score":"0.9x"}"#, false),
            (r#"{"score":"high"}"#, false),
            (r#"{"score":true}"#, false),
            (r#"{"score":-0.9}"#, false),
            ("{}", false),
        ] {
            assert_eq!(holds(ge, attributes), expected, "{attributes}");
        }
        let between = |op: &str, attributes: &str| {
            holds(
                &format!(r#"{{"field": "attributes.n", "{op}": "10"}}"#),
                attributes,
            )
        };
        for (op, nine, ten, eleven) in [
            ("lt", true, false, false),
            ("le", true, true, false),
            ("gt", false, false, true),
            ("ge", false, true, true),
            ("eq", false, true, false),
            ("ne", true, false, true),
        ] {
            assert_eq!(between(op, r#"{"n":9}"#), nine, "{op} 9");
            assert_eq!(between(op, r#"{"n":"10.0"}"#), ten, "{op} 10");
            assert_eq!(between(op, r#"{"n":1.1e1}"#), eleven, "{op} 11");
            assert!(!between(op, "{}"), "{op} missing");
        }
        // Typed decimal fields.
        let mut call = action("{}");
        let tokens = compiled(r#"{"field": "total_tokens", "gt": "1000"}"#);
        assert!(!tokens.holds(&call));
        call.total_tokens = Some(1001);
        assert!(tokens.holds(&call));
        call.reported_cost = Some("0.120".parse().unwrap());
        assert!(compiled(r#"{"field": "reported_cost", "eq": "0.12"}"#).holds(&call));
        assert!(compiled(r#"{"field": "reported_cost", "in": ["0.12", "1"]}"#).holds(&call));
    }

    #[test]
    fn booleans_compare_as_booleans() {
        let draft = r#"{"field": "attributes.draft", "eq": true}"#;
        assert!(holds(draft, r#"{"draft":true}"#));
        assert!(!holds(draft, r#"{"draft":false}"#));
        assert!(!holds(draft, r#"{"draft":"true"}"#));
        assert!(!holds(draft, r#"{"draft":1}"#));
        let not_true = r#"{"field": "attributes.draft", "ne": true}"#;
        assert!(holds(not_true, r#"{"draft":false}"#));
        assert!(!holds(not_true, r#"{"draft":"false"}"#));
        let either = r#"{"field": "attributes.draft", "in": [true, false]}"#;
        assert!(holds(either, r#"{"draft":false}"#));
        assert!(!holds(either, r#"{"draft":null}"#));
    }

    #[test]
    fn in_matches_one_of_a_list_of_one_type() {
        let models = r#"{"field": "attributes.model", "in": ["gpt-4o", "gemini-2.5-flash"]}"#;
        assert!(holds(models, r#"{"model":"gemini-2.5-flash"}"#));
        assert!(!holds(models, r#"{"model":"gpt-4"}"#));
        assert!(!holds(models, "{}"));
        let counts = r#"{"field": "attributes.boxes", "in": ["1", "2.5", "4"]}"#;
        assert!(holds(counts, r#"{"boxes":4}"#));
        assert!(holds(counts, r#"{"boxes":"2.50"}"#));
        assert!(!holds(counts, r#"{"boxes":3}"#));
        let mut call = action("{}");
        let llm = compiled(r#"{"field": "llm_model", "in": ["gpt-4o"]}"#);
        assert!(!llm.holds(&call));
        call.llm_model = Some("gpt-4o".into());
        assert!(llm.holds(&call));
    }

    #[test]
    fn exists_and_missing_fields() {
        let exists = r#"{"field": "attributes.draft", "exists": true}"#;
        let missing = r#"{"field": "attributes.draft", "exists": false}"#;
        let not_exists = r#"{"not": {"field": "attributes.draft", "exists": true}}"#;
        for (attributes, present) in [
            (r#"{"draft":false}"#, true),
            (r#"{"draft":{}}"#, true),
            (r#"{"draft":""}"#, true),
            (r#"{"draft":null}"#, false),
            (r#"{"other":1}"#, false),
            (r#"{"nested":{"draft":1}}"#, false),
            ("[]", false),
            ("{", false),
        ] {
            assert_eq!(holds(exists, attributes), present, "{attributes}");
            assert_eq!(holds(missing, attributes), !present, "{attributes}");
            assert_eq!(holds(not_exists, attributes), !present, "{attributes}");
        }
        let user = compiled(r#"{"field": "user_id", "exists": true}"#);
        let mut with_user = action("{}");
        assert!(!user.holds(&with_user));
        with_user.user_id = Some("u1".into());
        assert!(user.holds(&with_user));
    }

    #[test]
    fn matches_applies_a_regex_to_text() {
        let invoice = r#"{"field": "attributes.document", "matches": "^inv-[0-9]{4}$"}"#;
        assert!(holds(invoice, r#"{"document":"inv-2026"}"#));
        assert!(holds(invoice, r#"{"document":"inv-\u0032026"}"#));
        assert!(!holds(invoice, r#"{"document":"inv-20261"}"#));
        assert!(!holds(invoice, r#"{"document":2026}"#));
        assert!(!holds(invoice, "{}"));
        let unanchored = r#"{"field": "attributes.n", "matches": "12"}"#;
        assert!(!holds(unanchored, r#"{"n":123}"#), "numbers are no text");
        assert!(holds(unanchored, r#"{"n":"123"}"#));
        let mut call = action("{}");
        call.description = Some("Detected 4 objects in invoice".into());
        assert!(compiled(r#"{"field": "description", "matches": "(?i)INVOICE"}"#).holds(&call));
        let huge = format!(r#"{{"document":"{}"}}"#, "x".repeat(1 << 20));
        assert!(!holds(invoice, &huge));
    }

    #[test]
    fn the_brief_example_and_short_circuits() {
        let when = compiled(
            r#"{"all": [
                {"field": "attributes.status", "eq": "success"},
                {"field": "attributes.confidence_score", "ge": "0.9"},
                {"any": [
                    {"field": "llm_model", "in": ["gpt-4o", "gemini-2.5-flash"]},
                    {"not": {"field": "attributes.draft", "exists": true}}
                ]}
            ]}"#,
        );
        assert_eq!(when.attribute_keys.len(), 3);
        let mut detection = action(r#"{"status":"success","confidence_score":0.93}"#);
        assert!(when.holds(&detection));
        detection.attributes_json =
            r#"{"status":"success","confidence_score":0.93,"draft":1}"#.into();
        assert!(!when.holds(&detection));
        detection.llm_model = Some("gpt-4o".into());
        assert!(when.holds(&detection));
        detection.attributes_json = r#"{"status":"success","confidence_score":0.89}"#.into();
        assert!(!when.holds(&detection));
    }

    #[test]
    fn exact_decimal_never_rounds() {
        let d = |text: &str| text.parse::<Decimal>().unwrap();
        assert_eq!(exact_decimal("0", false), Some(Decimal::ZERO));
        assert_eq!(exact_decimal("-0.000", false), Some(Decimal::ZERO));
        assert_eq!(exact_decimal("007.50", false), Some(d("7.5")));
        assert_eq!(exact_decimal("-12.5", false), Some(d("-12.5")));
        assert_eq!(exact_decimal("1.5e3", true), Some(d("1500")));
        assert_eq!(exact_decimal("15E-1", true), Some(d("1.5")));
        assert_eq!(exact_decimal("1e+2", true), Some(d("100")));
        assert_eq!(exact_decimal("1e2", false), None);
        assert_eq!(
            exact_decimal("9999999999999999999999999999", false),
            Some(d("9999999999999999999999999999"))
        );
        assert_eq!(exact_decimal("99999999999999999999999999999", false), None);
        assert_eq!(
            exact_decimal("0.0000000000000000000000000001", false),
            Some(d("0.0000000000000000000000000001"))
        );
        assert_eq!(
            exact_decimal("0.00000000000000000000000000001", false),
            None
        );
        assert_eq!(exact_decimal("1e28", true), None);
        assert_eq!(
            exact_decimal("1e27", true),
            Some(d("1000000000000000000000000000"))
        );
        assert_eq!(exact_decimal("1e-99999999999999999999", true), None);
        assert_eq!(exact_decimal("0e99999", true), Some(Decimal::ZERO));
        for bad in [
            "", "-", ".5", "5.", "+5", "1_000", " 1", "1 ", "0x10", "1.2.3", "1e", "NaN", "١",
        ] {
            assert_eq!(exact_decimal(bad, true), None, "{bad:?}");
        }
    }

    #[test]
    fn unknown_operators_and_bare_numbers_are_refused_when_read() {
        let unknown = serde_json::from_str::<Condition>(r#"{"field": "attributes.a", "gte": "1"}"#)
            .unwrap_err()
            .to_string();
        assert!(unknown.contains("unknown field `gte`"), "{unknown}");
        let bare = serde_json::from_str::<Condition>(r#"{"field": "attributes.a", "ge": 0.9}"#)
            .unwrap_err()
            .to_string();
        assert!(bare.contains("quoted decimal strings"), "{bare}");
        let bare = toml::from_str::<Condition>("field = \"attributes.a\"\nge = 1\n")
            .unwrap_err()
            .to_string();
        assert!(bare.contains("quoted decimal strings"), "{bare}");
    }

    #[test]
    fn lists_every_type_problem_with_its_place() {
        let found = problems(
            r#"{"all": [
                {"field": "user_idd", "eq": "x"},
                {"field": "user_id", "lt": "5"},
                {"field": "attributes.score", "ge": "high"},
                {"field": "attributes.score", "gt": true},
                {"field": "input_tokens", "eq": "many"},
                {"field": "input_tokens", "matches": "1.*"},
                {"field": "llm_model", "eq": true},
                {"field": "attributes.model", "in": []},
                {"field": "attributes.model", "in": ["gpt-4o", "4"]},
                {"field": "attributes.model", "matches": "(unclosed"},
                {"field": "attributes.model", "matches": "a{1000}{1000}"},
                {"field": "attributes.model"},
                {"field": "attributes.model", "eq": "a", "ne": "b"},
                {"eq": "a"},
                {"field": "attributes."  , "exists": true},
                {"any": []},
                {"all": [{"field": "user_id", "exists": true}], "field": "user_id"}
            ]}"#,
        );
        let expected = [
            ("when.all[0]", "unknown field \"user_idd\""),
            ("when.all[1]", "\"user_id\" is a text field"),
            ("when.all[2]", "\"high\" is text"),
            ("when.all[3]", "true is boolean"),
            ("when.all[4]", "not a decimal"),
            ("when.all[5]", "`matches` applies to text"),
            ("when.all[6]", "is a text field; quote the value"),
            ("when.all[7]", "empty list"),
            ("when.all[8]", "mixes decimal and text"),
            ("when.all[9]", "does not compile"),
            ("when.all[10]", "does not compile"),
            ("when.all[11]", "has no operator"),
            ("when.all[12]", "several operators (eq, ne)"),
            ("when.all[13]", "needs `field`"),
            ("when.all[14]", "names no attribute"),
            ("when.all[15]", "empty list"),
            ("when.all[16]", "has all, field"),
        ];
        assert_eq!(found.len(), expected.len(), "{found:#?}");
        for ((place, text), problem) in expected.iter().zip(&found) {
            assert!(
                problem.starts_with(&format!("outcome \"o\": {place}: ")) && problem.contains(text),
                "expected {place} / {text}, got {problem}"
            );
        }
    }

    #[test]
    fn depth_and_size_are_bounded() {
        let mut deep = r#"{"field": "attributes.a", "exists": true}"#.to_string();
        for _ in 0..MAX_CONDITION_DEPTH - 1 {
            deep = format!(r#"{{"not": {deep}}}"#);
        }
        compiled(&deep);
        let deeper = format!(r#"{{"any": [{deep}]}}"#);
        let found = problems(&deeper);
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("deeper than 8"), "{found:?}");

        let comparison = r#"{"field": "attributes.a", "exists": true}"#;
        let list = |count: usize| format!(r#"{{"all": [{}]}}"#, vec![comparison; count].join(","));
        compiled(&list(MAX_CONDITION_COMPARISONS));
        let found = problems(&list(MAX_CONDITION_COMPARISONS + 1));
        assert_eq!(found.len(), 1, "{found:?}");
        assert!(found[0].contains("65 comparisons"), "{found:?}");
        let long = format!(
            r#"{{"field": "attributes.a", "matches": "{}"}}"#,
            "a".repeat(MAX_REGEX_BYTES + 1)
        );
        assert!(problems(&long)[0].contains("bytes long"));
    }

    #[test]
    fn compiled_conditions_are_equal_by_their_source_and_round_trip() {
        let text = r#"{"any":[{"field":"attributes.a","in":["1","2"]},{"not":{"field":"user_id","matches":"^u"}}]}"#;
        assert_eq!(compiled(text), compiled(text));
        assert_ne!(
            compiled(text),
            compiled(r#"{"field":"user_id","exists":true}"#)
        );
        assert_eq!(serde_json::to_string(&condition(text)).unwrap(), text);
    }

    /// Raw JSON texts for an attribute value: every type, extremes, escapes, junk.
    fn json_value() -> impl Strategy<Value = String> {
        let leaf = prop_oneof![
            Just("null".to_string()),
            any::<bool>().prop_map(|value| value.to_string()),
            any::<i64>().prop_map(|value| value.to_string()),
            any::<f64>()
                .prop_filter("finite", |value| value.is_finite())
                .prop_map(|value| serde_json::to_string(&value).unwrap()),
            "-?[0-9]{1,40}(\\.[0-9]{1,40})?([eE][-+]?[0-9]{1,25})?",
            prop_oneof![
                Just("0.9".to_string()),
                Just("1".to_string()),
                Just("success".to_string()),
                Just("gpt-4o".to_string()),
                ".{0,12}",
                "[0-9 .eE+-]{0,12}",
            ]
            .prop_map(|text| serde_json::to_string(&text).unwrap()),
            "\"(\\\\u00[0-7][0-9a-f]|\\\\[nt\"\\\\]|[a-z0-9])*\"",
        ];
        leaf.prop_recursive(4, 24, 4, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..4)
                    .prop_map(|values| format!("[{}]", values.join(","))),
                prop::collection::vec(("[a-c]", inner), 0..4).prop_map(|entries| {
                    let entries: Vec<String> = entries
                        .into_iter()
                        .map(|(key, value)| format!("{key:?}:{value}"))
                        .collect();
                    format!("{{{}}}", entries.join(","))
                }),
            ]
        })
    }

    fn attributes() -> impl Strategy<Value = String> {
        prop_oneof![
            8 => prop::collection::vec(("[a-d]|st\\\\u0061tus|status", json_value()), 0..6).prop_map(
                |entries| {
                    let entries: Vec<String> = entries
                        .into_iter()
                        .map(|(key, value)| format!("\"{key}\":{value}"))
                        .collect();
                    format!("{{{}}}", entries.join(","))
                }
            ),
            1 => json_value(),
            1 => ".{0,20}",
            1 => (1usize..300).prop_map(|depth| format!("{{\"a\":{}{}}}", "[".repeat(depth), "]".repeat(depth))),
        ]
    }

    fn decimal_literal() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"0.9\""),
            Just("\"1\""),
            Just("\"-5\""),
            Just("\"0\"")
        ]
        .prop_map(str::to_string)
    }

    fn text_literal() -> impl Strategy<Value = String> {
        prop_oneof![
            Just("\"success\""),
            Just("\"gpt-4o\""),
            Just("\"u1\""),
            Just("\"\"")
        ]
        .prop_map(str::to_string)
    }

    fn bool_literal() -> impl Strategy<Value = String> {
        any::<bool>().prop_map(|value| value.to_string())
    }

    fn list(literal: impl Strategy<Value = String>) -> impl Strategy<Value = String> {
        prop::collection::vec(literal, 1..4)
            .prop_map(|list| format!("\"in\": [{}]", list.join(",")))
    }

    /// `op: literal` for the six comparison operators.
    fn compare(literal: BoxedStrategy<String>, ordered: bool) -> BoxedStrategy<String> {
        let operators: Vec<&'static str> = if ordered {
            vec!["eq", "ne", "lt", "le", "gt", "ge"]
        } else {
            vec!["eq", "ne"]
        };
        (prop::sample::select(operators), literal)
            .prop_map(|(op, literal)| format!("\"{op}\": {literal}"))
            .boxed()
    }

    /// Well-typed comparisons (with the odd type error, which the property skips).
    fn comparison() -> impl Strategy<Value = String> {
        let exists = || any::<bool>().prop_map(|wanted| format!("\"exists\": {wanted}"));
        let matches = || {
            prop_oneof![Just("^s"), Just("[0-9]"), Just("(?i)GPT"), Just("")]
                .prop_map(|pattern| format!("\"matches\": {pattern:?}"))
        };
        let attribute = (
            prop_oneof![
                Just("attributes.a"),
                Just("attributes.b"),
                Just("attributes.c"),
                Just("attributes.status")
            ],
            prop_oneof![
                compare(decimal_literal().boxed(), true),
                compare(text_literal().boxed(), false),
                compare(bool_literal().boxed(), false),
                list(decimal_literal()),
                list(text_literal()),
                list(bool_literal()),
                exists(),
                matches(),
            ],
        );
        let text = (
            prop_oneof![Just("user_id"), Just("llm_model")],
            prop_oneof![
                compare(text_literal().boxed(), false),
                list(text_literal()),
                exists(),
                matches(),
            ],
        );
        let decimal = (
            prop_oneof![Just("input_tokens"), Just("reported_cost")],
            prop_oneof![
                compare(decimal_literal().boxed(), true),
                list(decimal_literal()),
                exists(),
                // A type error: skipped by the property.
                compare(bool_literal().boxed(), false),
            ],
        );
        prop_oneof![6 => attribute, 2 => text, 2 => decimal]
            .prop_map(|(field, operator)| format!("{{\"field\": \"{field}\", {operator}}}"))
    }

    fn condition_text() -> impl Strategy<Value = String> {
        comparison().prop_recursive(4, 16, 3, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 1..4)
                    .prop_map(|list| format!("{{\"all\": [{}]}}", list.join(","))),
                prop::collection::vec(inner.clone(), 1..4)
                    .prop_map(|list| format!("{{\"any\": [{}]}}", list.join(","))),
                inner.prop_map(|child| format!("{{\"not\": {child}}}")),
            ]
        })
    }

    fn raw_action() -> impl Strategy<Value = RawAction> {
        (
            attributes(),
            prop::option::of(prop_oneof![Just("u1".to_string()), ".{0,8}"]),
            prop::option::of(prop_oneof![
                Just("gpt-4o".to_string()),
                Just("success".to_string())
            ]),
            prop::option::of(any::<i64>()),
            prop::option::of((any::<i64>(), 0u32..=28))
                .prop_map(|cost| cost.map(|(mantissa, scale)| Decimal::new(mantissa, scale))),
        )
            .prop_map(
                |(attributes, user_id, llm_model, input_tokens, reported_cost)| RawAction {
                    user_id,
                    llm_model,
                    input_tokens,
                    reported_cost,
                    ..action(&attributes)
                },
            )
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2_000))]

        /// Evaluation never panics, and `not` is exactly the negation, whatever the action.
        #[test]
        fn evaluation_never_panics_and_not_negates(text in condition_text(), raw in raw_action()) {
            let condition = condition(&text);
            let negated = Condition {
                not: Some(Box::new(condition.clone())),
                ..Condition::default()
            };
            let (Ok(compiled), Ok(negated)) = (condition.compile("o"), negated.compile("o")) else {
                // Type errors (or a negation one level too deep) are refused at apply time.
                return Ok(());
            };
            prop_assert_eq!(
                negated.holds(&raw),
                !compiled.holds(&raw),
                "{} on {}",
                text,
                raw.attributes_json
            );
        }

        /// Attribute lookups agree with reading the attributes into a `serde_json::Value`.
        #[test]
        fn attribute_lookups_agree_with_serde_json(attributes in attributes()) {
            let keys: Box<[Box<str>]> =
                ["a", "b", "c", "d", "status"].into_iter().map(Box::from).collect();
            let mut slots = [None; 5];
            scan_attributes(&attributes, &keys, &mut slots);
            // serde_json::Value refuses numbers beyond f64 (1e400) that the scan passes over:
            // compare only where it reads the text.
            let Ok(parsed) = serde_json::from_str::<serde_json::Value>(&attributes) else {
                return Ok(());
            };
            for (key, slot) in keys.iter().zip(slots) {
                let expected = parsed.as_object().and_then(|object| object.get(key.as_ref()));
                let found =
                    slot.map(|raw| serde_json::from_str::<serde_json::Value>(raw.get()).unwrap());
                prop_assert_eq!(found.as_ref(), expected, "{} in {}", key, attributes);
            }
        }
    }
}
