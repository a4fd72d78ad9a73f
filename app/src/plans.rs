//! Plans: what each tenant may use per calendar month (UTC), read from the
//! YAML file named by `VM_PLANS_FILE` and validated at start-up with every
//! other setting.
//!
//! ```yaml
//! default_plan: free          # tenants without an assignment
//! warn_at: [0.8, 1.0]         # optional default of every plan's warn_at
//! plans:
//!   free:
//!     meters:
//!       runs: {allowance: 100, overage: block}
//!   pro:
//!     warn_at: [0.5, 0.8, 1.0]
//!     meters:
//!       runs: {allowance: 10000, overage: allow, unit_price: 0.002}
//! tenants:
//!   acme: pro
//! ```
//!
//! A meter a plan does not list is unlimited for that plan. Without
//! `VM_PLANS_FILE` nothing is limited (usage is still metered). This module
//! is pure: no I/O besides [`Plans::load`] reading the file.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde::Deserialize;
use serde::de::{Deserializer, MapAccess, Visitor};

/// What is counted. Stored and shown by [`Meter::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Meter {
    /// Runs created (counted, and limited, at creation).
    Runs,
    /// Steps executed (a step's result recorded).
    Steps,
    /// Prompt plus completion tokens reported by the LLM's `usage`.
    LlmTokens,
    /// Approval decisions (approve or reject of an approval step).
    ApprovalDecisions,
}

impl Meter {
    /// Every meter, in report order.
    pub const ALL: [Meter; 4] = [
        Meter::Runs,
        Meter::Steps,
        Meter::LlmTokens,
        Meter::ApprovalDecisions,
    ];

    /// The stored name: `runs`, `steps`, `llm_tokens`, `approval_decisions`.
    pub fn as_str(self) -> &'static str {
        match self {
            Meter::Runs => "runs",
            Meter::Steps => "steps",
            Meter::LlmTokens => "llm_tokens",
            Meter::ApprovalDecisions => "approval_decisions",
        }
    }

    /// The meter named `s`, if any.
    pub fn parse(s: &str) -> Option<Meter> {
        Meter::ALL.into_iter().find(|m| m.as_str() == s)
    }
}

/// What happens past the allowance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overage {
    /// Refuse new runs (`402 quota_exceeded`); admitted runs still finish.
    Block,
    /// Accept and bill the overage at the meter's unit price.
    Allow,
}

impl Overage {
    /// `block` or `allow`.
    pub fn as_str(self) -> &'static str {
        match self {
            Overage::Block => "block",
            Overage::Allow => "allow",
        }
    }
}

/// One meter of one plan.
#[derive(Debug, Clone, PartialEq)]
pub struct MeterRule {
    /// Units included per calendar month (UTC), ≥ 0.
    pub allowance: i64,
    /// Past the allowance: block or allow.
    pub overage: Overage,
    /// Price of one unit past the allowance, for the invoice preview (0 to
    /// [`MAX_UNIT_PRICE`], in the billing currency; 0 when not given).
    pub unit_price: f64,
}

/// One plan.
#[derive(Debug, Clone, PartialEq)]
pub struct Plan {
    /// The plan's name (its key in the file).
    pub name: String,
    /// Fractions of an allowance at which a warning is recorded, ascending,
    /// each in (0, 10]; default `[0.8, 1.0]`.
    pub warn_at: Vec<f64>,
    /// Rules per meter; a meter not listed is unlimited.
    pub meters: BTreeMap<Meter, MeterRule>,
}

impl Plan {
    /// The rule of `meter`, or `None` when the plan does not limit it.
    pub fn rule(&self, meter: Meter) -> Option<&MeterRule> {
        self.meters.get(&meter)
    }
}

/// The validated plans file.
#[derive(Debug, Clone, PartialEq)]
pub struct Plans {
    /// Plan of tenants with no assignment.
    pub default_plan: String,
    /// Plans by name.
    pub plans: BTreeMap<String, Plan>,
    /// Tenant → plan assignments of the file (assignments made through the
    /// API are stored in the database and take precedence).
    pub tenants: BTreeMap<String, String>,
}

/// Default warning thresholds: 80 % and 100 % of an allowance.
pub const DEFAULT_WARN_AT: [f64; 2] = [0.8, 1.0];

/// The largest `unit_price`: keeps every invoice preview (up to `i64::MAX`
/// units) a finite number.
pub const MAX_UNIT_PRICE: f64 = 1e9;

/// The largest plans file read, in bytes (a ConfigMap holds at most 1 MiB).
pub const MAX_FILE_BYTES: u64 = 1024 * 1024;

/// A YAML mapping whose keys must be distinct: YAML parsers keep the last of
/// two equal keys, which would silently drop a plan, a meter or a tenant
/// written twice.
struct UniqueMap<V>(BTreeMap<String, V>);

impl<V> Default for UniqueMap<V> {
    fn default() -> Self {
        UniqueMap(BTreeMap::new())
    }
}

impl<'de, V: Deserialize<'de>> Deserialize<'de> for UniqueMap<V> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Unique<V>(std::marker::PhantomData<V>);
        impl<'de, V: Deserialize<'de>> Visitor<'de> for Unique<V> {
            type Value = UniqueMap<V>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a map with distinct keys")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut out = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if out.contains_key(&key) {
                        return Err(serde::de::Error::custom(format!(
                            "duplicate key `{key}` (written twice; only one may stay)"
                        )));
                    }
                    let value = map.next_value()?;
                    out.insert(key, value);
                }
                Ok(UniqueMap(out))
            }
        }
        deserializer.deserialize_map(Unique(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    default_plan: String,
    #[serde(default)]
    warn_at: Option<Vec<f64>>,
    plans: UniqueMap<RawPlan>,
    #[serde(default)]
    tenants: UniqueMap<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlan {
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    warn_at: Option<Vec<f64>>,
    #[serde(default)]
    meters: UniqueMap<RawRule>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    allowance: i64,
    #[serde(default)]
    overage: Option<String>,
    #[serde(default)]
    unit_price: Option<f64>,
}

/// Whether `s` can name a plan or a tenant: 1 to 64 of letters, digits, `-`,
/// `_` (and `:`, which webhook tenants `webhook:<source>` carry).
pub fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_:".contains(&b))
}

/// Whether `s` can name a tenant: a [`valid_name`], or `webhook:` followed by
/// a webhook source's name (1 to 64 letters, digits, `-`, `_`), the tenant of
/// the runs that source starts.
pub fn valid_tenant(s: &str) -> bool {
    valid_name(s) || s.strip_prefix("webhook:").is_some_and(valid_name)
}

fn check_warn_at(values: &[f64], plan: &str, problems: &mut Vec<String>) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::with_capacity(values.len());
    for v in values {
        if !(v.is_finite() && *v > 0.0 && *v <= 10.0) {
            problems.push(format!(
                "plan `{plan}`: warn_at values must be fractions of the allowance above 0 and at most 10 (1.0 is 100%)"
            ));
            return Vec::new();
        }
        out.push(*v);
    }
    out.sort_by(f64::total_cmp);
    out.dedup();
    out
}

impl Plans {
    /// Parses and validates the YAML text of a plans file. Errors: every
    /// problem found, each naming the plan and the meter it concerns (the
    /// caller prefixes the variable).
    pub fn parse(yaml: &str) -> Result<Plans, Vec<String>> {
        let raw: RawFile = serde_norway::from_str(yaml).map_err(|e| vec![format!("{e}")])?;
        let mut problems = Vec::new();
        let default_warn = match &raw.warn_at {
            Some(values) => check_warn_at(values, "(top level)", &mut problems),
            None => DEFAULT_WARN_AT.to_vec(),
        };
        let (raw_plans, raw_tenants) = (raw.plans.0, raw.tenants.0);
        if raw_plans.is_empty() {
            problems.push("`plans` lists no plan".to_string());
        }
        let mut plans = BTreeMap::new();
        for (name, rp) in raw_plans {
            let _ = rp.description;
            if !valid_name(&name) {
                problems.push(format!(
                    "plan `{name}`: a plan name must be 1 to 64 letters, digits, - or _"
                ));
                continue;
            }
            let warn_at = match &rp.warn_at {
                Some(values) => check_warn_at(values, &name, &mut problems),
                None => default_warn.clone(),
            };
            let mut meters = BTreeMap::new();
            for (meter_name, rule) in rp.meters.0 {
                let Some(meter) = Meter::parse(&meter_name) else {
                    problems.push(format!(
                        "plan `{name}`: unknown meter `{meter_name}` (expected one of {})",
                        Meter::ALL.map(Meter::as_str).join(", ")
                    ));
                    continue;
                };
                if rule.allowance < 0 {
                    problems.push(format!(
                        "plan `{name}`, meter `{meter_name}`: allowance must be a whole number of at least 0"
                    ));
                }
                let overage = match rule.overage.as_deref() {
                    None | Some("block") => Overage::Block,
                    Some("allow") => Overage::Allow,
                    Some(_) => {
                        problems.push(format!(
                            "plan `{name}`, meter `{meter_name}`: overage must be block or allow"
                        ));
                        Overage::Block
                    }
                };
                let unit_price = rule.unit_price.unwrap_or(0.0);
                if !(unit_price.is_finite() && (0.0..=MAX_UNIT_PRICE).contains(&unit_price)) {
                    problems.push(format!(
                        "plan `{name}`, meter `{meter_name}`: unit_price must be a number from 0 to {MAX_UNIT_PRICE}"
                    ));
                }
                meters.insert(
                    meter,
                    MeterRule {
                        allowance: rule.allowance,
                        overage,
                        unit_price,
                    },
                );
            }
            plans.insert(
                name.clone(),
                Plan {
                    name,
                    warn_at,
                    meters,
                },
            );
        }
        if !plans.contains_key(&raw.default_plan) {
            problems.push(format!(
                "default_plan `{}` is not one of the plans",
                raw.default_plan
            ));
        }
        for (tenant, plan) in &raw_tenants {
            if !valid_tenant(tenant) {
                problems.push(format!(
                    "tenants: `{tenant}` is not a tenant name (1 to 64 letters, digits, -, _ or :, or webhook:<source>)"
                ));
            }
            if !plans.contains_key(plan) {
                problems.push(format!(
                    "tenants: tenant `{tenant}` is assigned plan `{plan}`, which is not one of the plans"
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(Plans {
            default_plan: raw.default_plan,
            plans,
            tenants: raw_tenants,
        })
    }

    /// Reads and validates the plans file at `path`. Errors as
    /// [`Plans::parse`], or the file cannot be read, is not a regular file
    /// (a directory, a device such as `/dev/zero`), is larger than
    /// [`MAX_FILE_BYTES`] or is not UTF-8.
    pub fn load(path: &Path) -> Result<Plans, Vec<String>> {
        let cannot =
            |e: &dyn std::fmt::Display| vec![format!("cannot read {}: {e}", path.display())];
        let file = std::fs::File::open(path).map_err(|e| cannot(&e))?;
        let meta = file.metadata().map_err(|e| cannot(&e))?;
        if !meta.is_file() {
            return Err(cannot(&"not a regular file"));
        }
        let mut bytes = Vec::new();
        file.take(MAX_FILE_BYTES + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| cannot(&e))?;
        if bytes.len() as u64 > MAX_FILE_BYTES {
            return Err(cannot(&format!(
                "larger than {MAX_FILE_BYTES} bytes (a plans file is a few KiB)"
            )));
        }
        let text = String::from_utf8(bytes).map_err(|_| cannot(&"not UTF-8 text"))?;
        Plans::parse(&text)
    }

    /// The plan named `name`.
    pub fn plan(&self, name: &str) -> Option<&Plan> {
        self.plans.get(name)
    }

    /// The plan the file gives `tenant`: its entry in `tenants`, else the
    /// default plan.
    pub fn file_plan_of(&self, tenant: &str) -> &str {
        self.tenants
            .get(tenant)
            .map_or(self.default_plan.as_str(), String::as_str)
    }

    /// Every warning threshold any plan uses, for metrics created at zero.
    pub fn all_thresholds(&self) -> Vec<f64> {
        let mut all: Vec<f64> = self
            .plans
            .values()
            .flat_map(|p| p.warn_at.iter().copied())
            .collect();
        all.sort_by(f64::total_cmp);
        all.dedup();
        all
    }
}

/// A threshold as a label and stored value: `0.8`, `1.0`, `1.5`.
pub fn threshold_label(t: f64) -> String {
    if t.fract() == 0.0 {
        format!("{t:.1}")
    } else {
        format!("{t}")
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const ISSUE_EXAMPLE: &str = r#"
default_plan: free
plans:
  free:
    meters:
      runs: {allowance: 100, overage: block}
      llm_tokens: {allowance: 100000, overage: block}
  pro:
    warn_at: [0.8, 1.0]
    meters:
      runs: {allowance: 10000, overage: allow, unit_price: 0.002}
      llm_tokens: {allowance: 5000000, overage: allow, unit_price: 0.000002}
tenants:
  acme: pro
"#;

    #[test]
    fn the_issue_example_parses_with_default_thresholds_and_unlimited_unlisted_meters() {
        let plans = Plans::parse(ISSUE_EXAMPLE).unwrap();
        assert_eq!(plans.file_plan_of("acme"), "pro");
        assert_eq!(plans.file_plan_of("other"), "free");
        let free = plans.plan("free").unwrap();
        assert_eq!(free.warn_at, vec![0.8, 1.0]);
        assert_eq!(free.rule(Meter::Runs).unwrap().allowance, 100);
        assert_eq!(free.rule(Meter::Runs).unwrap().overage, Overage::Block);
        assert!(free.rule(Meter::Steps).is_none());
        let pro = plans.plan("pro").unwrap();
        assert_eq!(pro.rule(Meter::Runs).unwrap().unit_price, 0.002);
    }

    #[test]
    fn mistakes_name_the_plan_and_the_meter() {
        let yaml = r#"
default_plan: gold
plans:
  free:
    warn_at: [0]
    meters:
      runz: {allowance: 1}
      runs: {allowance: -1, overage: maybe, unit_price: -2}
tenants:
  acme: platinum
"#;
        let problems = Plans::parse(yaml).unwrap_err().join("\n");
        for expected in [
            "plan `free`: unknown meter `runz`",
            "plan `free`, meter `runs`: allowance",
            "plan `free`, meter `runs`: overage must be block or allow",
            "plan `free`, meter `runs`: unit_price",
            "plan `free`: warn_at",
            "default_plan `gold`",
            "tenant `acme` is assigned plan `platinum`",
        ] {
            assert!(
                problems.contains(expected),
                "{expected} missing in:\n{problems}"
            );
        }
    }

    #[test]
    fn unknown_keys_and_wrong_types_are_refused_with_their_place() {
        let err =
            Plans::parse("default_plan: free\nplans:\n  free:\n    meterz: {}\n").unwrap_err();
        assert!(err[0].contains("meterz"), "{err:?}");
        let err = Plans::parse(
            "default_plan: free\nplans:\n  free:\n    meters:\n      runs: {allowance: lots}\n",
        )
        .unwrap_err();
        assert!(err[0].contains("allowance"), "{err:?}");
    }

    /// The documented example must stay loadable.
    #[test]
    fn the_example_plans_file_is_valid() {
        let plans = Plans::parse(include_str!("../../examples/plans.yaml")).unwrap();
        assert_eq!(plans.file_plan_of("acme"), "pro");
        assert!(plans.plan("enterprise").unwrap().meters.is_empty());
        assert_eq!(plans.plan("pro").unwrap().warn_at, vec![0.5, 0.8, 1.0]);
    }

    #[test]
    fn thresholds_render_as_stable_labels() {
        assert_eq!(threshold_label(1.0), "1.0");
        assert_eq!(threshold_label(0.8), "0.8");
        assert_eq!(threshold_label(1.5), "1.5");
    }
}
