//! Kube-aware version ordering, as kube-aggregator sorts versions within a group.
//!
//! Versions shaped `v<major>[(alpha|beta)<minor>]` rank above every other string: GA before
//! beta before alpha, then by major, then by minor. Strings that are not kube-like rank below
//! all kube-like ones and among themselves in plain lexical order (`foo1` before `foo10`).
//!
//! ```
//! use kube_aggregation_proxy::apiservice::version::compare_kube_aware;
//! let mut versions = vec!["v11alpha2", "v1", "foo10", "v10beta3", "v2", "foo1", "v10"];
//! versions.sort_by(|a, b| compare_kube_aware(b, a));
//! assert_eq!(versions, ["v10", "v2", "v1", "v10beta3", "v11alpha2", "foo1", "foo10"]);
//! ```

use std::cmp::Ordering;

/// The maturity of a kube-like version; the derive order is the ranking order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Stability {
    Alpha,
    Beta,
    Ga,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct KubeVersion {
    major: u64,
    stability: Stability,
    minor: u64,
}

impl KubeVersion {
    /// Parses `v<digits>` optionally followed by `alpha<digits>` or `beta<digits>`.
    /// Numbers that overflow make the string not kube-like, as in kube's parser.
    fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix('v')?;
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let major = rest[..digits].parse().ok()?;
        let suffix = &rest[digits..];
        if suffix.is_empty() {
            return Some(Self { major, stability: Stability::Ga, minor: 0 });
        }
        let (stability, minor) = if let Some(m) = suffix.strip_prefix("alpha") {
            (Stability::Alpha, m)
        } else if let Some(m) = suffix.strip_prefix("beta") {
            (Stability::Beta, m)
        } else {
            return None;
        };
        if minor.is_empty() || !minor.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        Some(Self { major, stability, minor: minor.parse().ok()? })
    }
}

/// Compares two version strings by kube's rules: `Greater` means `a` is preferred over `b`.
pub fn compare_kube_aware(a: &str, b: &str) -> Ordering {
    if a == b {
        return Ordering::Equal;
    }
    match (KubeVersion::parse(a), KubeVersion::parse(b)) {
        (None, None) => b.cmp(a),
        (Some(_), None) => Ordering::Greater,
        (None, Some(_)) => Ordering::Less,
        (Some(x), Some(y)) => x.stability.cmp(&y.stability).then(x.major.cmp(&y.major)).then(x.minor.cmp(&y.minor)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn canonical_order_from_the_apiservice_docs() {
        let expected =
            ["v10", "v2", "v1", "v11beta2", "v10beta3", "v3beta1", "v12alpha1", "v11alpha2", "foo1", "foo10"];
        let mut shuffled = expected.to_vec();
        shuffled.reverse();
        shuffled.swap(0, 4);
        shuffled.sort_by(|a, b| compare_kube_aware(b, a));
        assert_eq!(shuffled, expected);
    }

    #[test]
    fn malformed_versions_are_not_kube_like() {
        for s in ["v1beta", "V1", "v1.1", "v1-beta1", "v0x", "v", "beta1", "v99999999999999999999999"] {
            assert_eq!(KubeVersion::parse(s), None, "{s}");
            assert_eq!(compare_kube_aware("v1alpha1", s), Ordering::Greater, "{s}");
        }
        assert!(KubeVersion::parse("v0").is_some());
    }

    #[test]
    fn leading_zeros_compare_equal_to_their_value() {
        assert_eq!(compare_kube_aware("v01", "v1"), Ordering::Equal);
    }

    proptest! {
        #[test]
        fn comparison_is_antisymmetric(a in "(v[0-9]{1,3}((alpha|beta)[0-9]{1,2})?|[a-z0-9]{1,5})",
                                       b in "(v[0-9]{1,3}((alpha|beta)[0-9]{1,2})?|[a-z0-9]{1,5})") {
            prop_assert_eq!(compare_kube_aware(&a, &b), compare_kube_aware(&b, &a).reverse());
        }

        #[test]
        fn comparison_is_transitive(mut v in proptest::collection::vec(
            "(v[0-9]{1,2}((alpha|beta)[0-9])?|[a-z][a-z0-9]{0,3})", 3)) {
            v.sort_by(|a, b| compare_kube_aware(a, b));
            prop_assert!(compare_kube_aware(&v[0], &v[2]) != Ordering::Greater);
        }
    }
}
