//! CDC field bitmaps (`changedFields`, `nulledFields`, `diffFields`) to field names and back.
//!
//! Salesforce sends these header fields as arrays of hex strings, not names: the first element is a bitmap over the
//! top-level fields of the event's writer schema (bit 0 is `ChangeEventHeader`), and every further `P-0x..` element
//! is a bitmap over the fields of the compound field at top-level position `P` (an Address, say). The layout and
//! the reference implementations are summarised in shared/reference/salesforce-pubsub.md §4.4.
//!
//! The bitmaps can be wider than 128 bits (objects with many fields), so they are walked one hex digit at a time and
//! never parsed into a fixed-width integer.

use std::fmt;

/// Why a bitmap array could not be decoded or encoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BitmapError {
    #[error("bitmap entry `{entry}` is truncated: {what}")]
    Truncated { entry: String, what: &'static str },
    #[error("bitmap entry `{entry}` has `{digit}`, which is not a hex digit")]
    BadHex { entry: String, digit: char },
    #[error("bitmap entry `{entry}` has parent index `{index}`, which is not a decimal number")]
    BadIndex { entry: String, index: String },
    #[error("bitmap entry `{entry}` points at field position {index}, but the schema has only {count} fields")]
    IndexOutOfRange { entry: String, index: usize, count: usize },
    #[error("bitmap entry `{entry}` points at `{field}`, which is not a compound (record) field")]
    NotARecord { entry: String, field: String },
    #[error("field `{0}` is not in the writer schema, so it has no bit")]
    UnknownField(String),
}

/// A top-level field of a writer schema, as far as the bitmaps need to know it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSlot {
    pub name: String,
    /// For a compound field: the fields of the record branch of its union, in schema order.
    pub children: Option<Vec<String>>,
}

/// The top-level fields of a writer schema in declaration order; position 0 is `ChangeEventHeader`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FieldLayout {
    pub fields: Vec<FieldSlot>,
}

impl FieldLayout {
    /// A layout of plain (non-compound) fields, handy in tests.
    pub fn flat<S: AsRef<str>>(names: &[S]) -> Self {
        let fields = names
            .iter()
            .map(|n| FieldSlot {
                name: n.as_ref().to_owned(),
                children: None,
            })
            .collect();
        Self { fields }
    }

    /// Marks the field `name` as a compound field with the given sub-fields (builder style, for tests).
    pub fn with_children<S: AsRef<str>>(mut self, name: &str, children: &[S]) -> Self {
        if let Some(slot) = self.fields.iter_mut().find(|f| f.name == name) {
            slot.children = Some(children.iter().map(|c| c.as_ref().to_owned()).collect());
        }
        self
    }

    fn position(&self, name: &str) -> Option<usize> {
        self.fields.iter().position(|f| f.name == name)
    }
}

/// Position of `ChangeEventHeader` in every CDC schema; its bit carries no field name.
const HEADER_POSITION: usize = 0;

/// Decodes one bitmap array (e.g. `["0x068020", "8-0x0A"]`) to field names: top-level fields in schema order first,
/// then `Parent.Child` names in the order of the nested entries.
///
/// Bits past the end of a field list are ignored with a warning: Salesforce may know fields that the schema we were
/// handed does not (the reference clients do the same, or crash).
pub fn decode(entries: &[String], layout: &FieldLayout) -> Result<Vec<String>, BitmapError> {
    let mut names = Vec::new();
    for entry in entries {
        match entry.split_once('-') {
            None => {
                for bit in set_bits(entry, hex_digits(entry)?)? {
                    match layout.fields.get(bit) {
                        Some(_) if bit == HEADER_POSITION => {}
                        Some(slot) => names.push(slot.name.clone()),
                        None => warn_out_of_range(entry, bit, layout.fields.len(), None),
                    }
                }
            }
            Some((index, hex)) => {
                let position = parse_index(entry, index)?;
                let digits = hex_digits_of(entry, hex)?;
                let parent = layout
                    .fields
                    .get(position)
                    .ok_or_else(|| BitmapError::IndexOutOfRange {
                        entry: entry.clone(),
                        index: position,
                        count: layout.fields.len(),
                    })?;
                let children = match (&parent.children, position) {
                    (Some(children), p) if p != HEADER_POSITION => children,
                    _ => {
                        return Err(BitmapError::NotARecord {
                            entry: entry.clone(),
                            field: parent.name.clone(),
                        });
                    }
                };
                for bit in set_bits(entry, digits)? {
                    match children.get(bit) {
                        Some(child) => names.push(format!("{}.{child}", parent.name)),
                        None => warn_out_of_range(entry, bit, children.len(), Some(&parent.name)),
                    }
                }
            }
        }
    }
    Ok(names)
}

/// Encodes field names (`Status`, `BillingAddress.City`) as a Salesforce bitmap array: one top-level bitmap when any
/// top-level bit is set, then one `P-0x..` entry per compound parent in schema order. Digits are upper case and
/// byte-aligned, as Salesforce sends them. No names gives an empty array.
pub fn encode<S: AsRef<str>>(names: &[S], layout: &FieldLayout) -> Result<Vec<String>, BitmapError> {
    let mut top = Bits::default();
    // Indexed by parent position so the nested entries come out in schema order whatever the input order.
    let mut nested: Vec<Option<Bits>> = vec![None; layout.fields.len()];
    for name in names {
        let name = name.as_ref();
        let unknown = || BitmapError::UnknownField(name.to_owned());
        match name.split_once('.') {
            None => top.set(layout.position(name).ok_or_else(unknown)?),
            Some((parent, child)) => {
                let position = layout.position(parent).ok_or_else(unknown)?;
                let children = layout.fields[position].children.as_ref().ok_or_else(unknown)?;
                let bit = children.iter().position(|c| c == child).ok_or_else(unknown)?;
                nested[position].get_or_insert_with(Bits::default).set(bit);
            }
        }
    }
    let mut out = Vec::new();
    if !top.is_empty() {
        out.push(top.to_string());
    }
    for (position, bits) in nested.into_iter().enumerate() {
        if let Some(bits) = bits {
            out.push(format!("{position}-{bits}"));
        }
    }
    Ok(out)
}

/// Strips the optional `0x`/`0X` prefix and checks that something is left.
fn hex_digits(entry: &str) -> Result<&str, BitmapError> {
    hex_digits_of(entry, entry)
}

fn hex_digits_of<'a>(entry: &str, hex: &'a str) -> Result<&'a str, BitmapError> {
    let digits = hex.strip_prefix("0x").or_else(|| hex.strip_prefix("0X")).unwrap_or(hex);
    if digits.is_empty() {
        return Err(BitmapError::Truncated {
            entry: entry.to_owned(),
            what: "no hex digits",
        });
    }
    Ok(digits)
}

fn parse_index(entry: &str, index: &str) -> Result<usize, BitmapError> {
    if index.is_empty() {
        return Err(BitmapError::Truncated {
            entry: entry.to_owned(),
            what: "no parent index before `-`",
        });
    }
    if !index.bytes().all(|b| b.is_ascii_digit()) {
        return Err(BitmapError::BadIndex {
            entry: entry.to_owned(),
            index: index.to_owned(),
        });
    }
    // All digits, so the only failure left is overflow: such a position is out of range of any schema.
    index.parse().map_err(|_| BitmapError::IndexOutOfRange {
        entry: entry.to_owned(),
        index: usize::MAX,
        count: 0,
    })
}

/// The positions of the set bits of a big-endian hex string, lowest first. Bit 0 is the least significant bit of the
/// last digit.
fn set_bits(entry: &str, digits: &str) -> Result<Vec<usize>, BitmapError> {
    let mut bits = Vec::new();
    for (nibble_index, digit) in digits.chars().rev().enumerate() {
        let value = digit.to_digit(16).ok_or_else(|| BitmapError::BadHex {
            entry: entry.to_owned(),
            digit,
        })?;
        for bit in 0..4 {
            if value & (1 << bit) != 0 {
                bits.push(nibble_index * 4 + bit);
            }
        }
    }
    Ok(bits)
}

fn warn_out_of_range(entry: &str, bit: usize, count: usize, parent: Option<&str>) {
    tracing::warn!(
        entry,
        bit,
        field_count = count,
        parent = parent.unwrap_or(""),
        "A change-event bitmap sets a bit beyond the writer schema's fields; the bit is ignored."
    );
}

/// A growable little-endian bit set, rendered as a big-endian hex string.
#[derive(Debug, Clone, Default)]
struct Bits(Vec<u8>);

impl Bits {
    fn set(&mut self, bit: usize) {
        let byte = bit / 8;
        if self.0.len() <= byte {
            self.0.resize(byte + 1, 0);
        }
        self.0[byte] |= 1 << (bit % 8);
    }

    fn is_empty(&self) -> bool {
        self.0.iter().all(|b| *b == 0)
    }
}

impl fmt::Display for Bits {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("0x")?;
        let significant = self.0.iter().rposition(|b| *b != 0).map_or(0, |i| i + 1);
        if significant == 0 {
            return f.write_str("00");
        }
        for byte in self.0[..significant].iter().rev() {
            write!(f, "{byte:02X}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn strings(items: &[&str]) -> Vec<String> {
        items.iter().map(|s| s.to_string()).collect()
    }

    /// AccountChangeEvent field order from the reference's worked example 1.
    fn account() -> FieldLayout {
        FieldLayout::flat(&[
            "ChangeEventHeader",
            "Name",
            "Type",
            "ParentId",
            "BillingAddress",
            "ShippingAddress",
            "Phone",
            "Fax",
            "AccountNumber",
            "Website",
            "Sic",
            "Industry",
            "AnnualRevenue",
            "NumberOfEmployees",
            "Ownership",
            "TickerSymbol",
            "Description",
            "Rating",
            "Site",
            "OwnerId",
            "CreatedDate",
            "CreatedById",
            "LastModifiedDate",
        ])
    }

    const ADDRESS: [&str; 11] = [
        "Street",
        "City",
        "State",
        "PostalCode",
        "Country",
        "StateCode",
        "CountryCode",
        "Latitude",
        "Longitude",
        "Xyz",
        "GeocodeAccuracy",
    ];

    /// The sample OrderChangeEvent field order from the reference's worked example 2.
    fn order() -> FieldLayout {
        FieldLayout::flat(&[
            "ChangeEventHeader",
            "OwnerId",
            "ContractId",
            "AccountId",
            "Pricebook2Id",
            "Status",
            "Type",
            "Description",
            "BillingAddress",
            "ShippingAddress",
            "Name",
            "OrderNumber",
            "TotalAmount",
            "CreatedDate",
            "CreatedById",
            "LastModifiedDate",
            "LastModifiedById",
            "Activation_Status__c",
            "WHMCS_Order_ID__c",
        ])
        .with_children("BillingAddress", &ADDRESS)
        .with_children("ShippingAddress", &ADDRESS)
    }

    #[test]
    fn official_account_example_decodes_to_fax_and_last_modified_date() {
        let names = decode(&strings(&["0x400080"]), &account()).unwrap();
        assert_eq!(names, ["Fax", "LastModifiedDate"]);
    }

    #[test]
    fn sample_order_example_decodes_top_level_then_nested_fields() {
        let names = decode(&strings(&["0x068020", "8-0x0A"]), &order()).unwrap();
        assert_eq!(
            names,
            [
                "Status",
                "LastModifiedDate",
                "Activation_Status__c",
                "WHMCS_Order_ID__c",
                "BillingAddress.City",
                "BillingAddress.PostalCode"
            ]
        );
    }

    #[test]
    fn hex_case_and_prefix_do_not_matter() {
        let expected = decode(&strings(&["0x650004e0"]), &account()).unwrap();
        for variant in ["0x650004E0", "0X650004e0", "650004E0", "650004e0"] {
            assert_eq!(decode(&strings(&[variant]), &account()).unwrap(), expected, "{variant}");
        }
        assert_eq!(decode(&strings(&["0x068020", "8-0x0a"]), &order()).unwrap().len(), 6);
    }

    #[test]
    fn nulled_description_and_all_address_subfields() {
        assert_eq!(decode(&strings(&["0x80"]), &order()).unwrap(), ["Description"]);
        let all = decode(&strings(&["8-0x07FF"]), &order()).unwrap();
        assert_eq!(all.len(), ADDRESS.len());
        assert_eq!(all[0], "BillingAddress.Street");
        assert_eq!(all[10], "BillingAddress.GeocodeAccuracy");
    }

    #[test]
    fn array_with_only_nested_entries_is_decoded() {
        let names = decode(&strings(&["9-0x02", "8-0x01"]), &order()).unwrap();
        assert_eq!(names, ["ShippingAddress.City", "BillingAddress.Street"]);
    }

    #[test]
    fn header_bit_is_never_a_name_and_empty_array_is_no_fields() {
        assert_eq!(decode(&strings(&["0x01"]), &order()).unwrap(), Vec::<String>::new());
        assert_eq!(decode(&[], &order()).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn bits_beyond_the_schema_are_ignored() {
        // Bits 19 and 44 are past the 19 fields of the sample order; bit 5 is Status.
        let names = decode(&strings(&["0x0100000080020"]), &order()).unwrap();
        assert_eq!(names, ["Status"]);
        let nested = decode(&strings(&["8-0xF002"]), &order()).unwrap();
        assert_eq!(nested, ["BillingAddress.City"]);
    }

    #[test]
    fn bitmaps_wider_than_128_bits_decode_exactly() {
        let names: Vec<String> = (0..200).map(|i| format!("F{i}")).collect();
        let layout = FieldLayout::flat(&names);
        // Bits 1, 130 and 199: 50 hex digits.
        let mut digits = ['0'; 50];
        digits[49] = '2';
        digits[49 - 130 / 4] = char::from_digit(1 << (130 % 4), 16).unwrap();
        digits[49 - 199 / 4] = char::from_digit(1 << (199 % 4), 16).unwrap();
        let entry: String = std::iter::once("0x".to_string())
            .chain(digits.iter().map(|c| c.to_string()))
            .collect();
        assert_eq!(decode(&[entry], &layout).unwrap(), ["F1", "F130", "F199"]);
    }

    #[test]
    fn malformed_entries_are_typed_errors() {
        let layout = order();
        let err = |e: &str| decode(&strings(&[e]), &layout).unwrap_err();
        assert!(matches!(err("0x"), BitmapError::Truncated { .. }));
        assert!(matches!(err(""), BitmapError::Truncated { .. }));
        assert!(matches!(err("3-"), BitmapError::Truncated { .. }));
        assert!(matches!(err("8-0x"), BitmapError::Truncated { .. }));
        assert!(matches!(err("-0x01"), BitmapError::Truncated { .. }));
        assert!(matches!(err("0xZZ"), BitmapError::BadHex { digit: 'Z', .. }));
        assert!(matches!(err("8-0x0G"), BitmapError::BadHex { .. }));
        assert!(matches!(err("x-0x01"), BitmapError::BadIndex { .. }));
        assert!(matches!(err("+8-0x01"), BitmapError::BadIndex { .. }));
        assert!(matches!(err("99-0x01"), BitmapError::IndexOutOfRange { index: 99, .. }));
        assert!(matches!(
            err("99999999999999999999999-0x01"),
            BitmapError::IndexOutOfRange { .. }
        ));
        assert!(matches!(err("5-0x01"), BitmapError::NotARecord { .. }));
        assert!(matches!(err("0-0x01"), BitmapError::NotARecord { .. }));
    }

    #[test]
    fn encode_produces_salesforce_shaped_entries() {
        let names = [
            "WHMCS_Order_ID__c",
            "BillingAddress.PostalCode",
            "Status",
            "LastModifiedDate",
            "Activation_Status__c",
            "BillingAddress.City",
        ];
        assert_eq!(encode(&names, &order()).unwrap(), ["0x068020", "8-0x0A"]);
        assert_eq!(encode(&["ShippingAddress.Street"], &order()).unwrap(), ["9-0x01"]);
        assert_eq!(encode::<&str>(&[], &order()).unwrap(), Vec::<String>::new());
        assert_eq!(
            encode(&["Nope"], &order()).unwrap_err(),
            BitmapError::UnknownField("Nope".into())
        );
        assert!(encode(&["Status.City"], &order()).is_err());
        assert!(encode(&["BillingAddress.Nope"], &order()).is_err());
    }

    /// xorshift64*: deterministic, so a failure reproduces from the printed seed.
    struct Prng(u64);

    impl Prng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
        }

        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    #[test]
    fn random_names_round_trip_through_bitmaps_of_any_width() {
        let mut rng = Prng(0x5EED_CAFE_F00D_0001);
        for round in 0..500 {
            let width = 2 + rng.below(400);
            let mut names: Vec<String> = vec!["ChangeEventHeader".into()];
            names.extend((1..width).map(|i| format!("Field{i}")));
            let compound = 1 + rng.below(width - 1);
            let children: Vec<String> = (0..1 + rng.below(20)).map(|i| format!("Sub{i}")).collect();
            let layout = FieldLayout::flat(&names).with_children(&names[compound], &children);

            let mut chosen: Vec<String> = Vec::new();
            for (i, name) in names.iter().enumerate().skip(1) {
                if rng.below(4) == 0 {
                    chosen.push(name.clone());
                }
                if i == compound {
                    for child in &children {
                        if rng.below(3) == 0 {
                            chosen.push(format!("{name}.{child}"));
                        }
                    }
                }
            }
            let mut entries = encode(&chosen, &layout).unwrap();
            if rng.below(2) == 0 {
                entries = entries.iter().map(|e| e.to_lowercase()).collect();
            }
            let mut decoded = decode(&entries, &layout).unwrap();
            let mut expected = chosen.clone();
            decoded.sort();
            expected.sort();
            assert_eq!(decoded, expected, "round {round}, width {width}, entries {entries:?}");
        }
    }

    #[test]
    fn random_garbage_never_panics() {
        let mut rng = Prng(0xBAD_5EED);
        let alphabet: Vec<char> = "0123456789abcdefABCDEFxX-- gz".chars().collect();
        for _ in 0..2000 {
            let entry: String = (0..rng.below(12))
                .map(|_| alphabet[rng.below(alphabet.len())])
                .collect();
            let _ = decode(&[entry], &order());
        }
    }
}
