//! Identifiers that cross the system: regions, accounts, and the shapes of AWS ids and ARNs.

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::diag::did_you_mean;

/// The AWS regions kiln knows by name. A name of the same shape that is not listed is accepted
/// (regions are added every year) unless it is a likely misspelling of a listed one.
pub const KNOWN_REGIONS: &[&str] = &[
    "us-east-1",
    "us-east-2",
    "us-west-1",
    "us-west-2",
    "af-south-1",
    "ap-east-1",
    "ap-east-2",
    "ap-south-1",
    "ap-south-2",
    "ap-southeast-1",
    "ap-southeast-2",
    "ap-southeast-3",
    "ap-southeast-4",
    "ap-southeast-5",
    "ap-southeast-6",
    "ap-southeast-7",
    "ap-northeast-1",
    "ap-northeast-2",
    "ap-northeast-3",
    "ca-central-1",
    "ca-west-1",
    "eu-central-1",
    "eu-central-2",
    "eu-west-1",
    "eu-west-2",
    "eu-west-3",
    "eu-south-1",
    "eu-south-2",
    "eu-north-1",
    "il-central-1",
    "me-south-1",
    "me-central-1",
    "mx-central-1",
    "sa-east-1",
    "us-gov-east-1",
    "us-gov-west-1",
    "cn-north-1",
    "cn-northwest-1",
];

/// An AWS region name (also the name of an embedded region).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Region(String);

impl Region {
    pub fn parse(s: &str) -> Result<Region, String> {
        if KNOWN_REGIONS.contains(&s) {
            return Ok(Region(s.to_string()));
        }
        let shaped = regex_is_match(r"^[a-z]{2}(-gov|-iso[a-z]?)?-[a-z]+-[1-9]$", s);
        // A known area with a new number (`ap-southeast-9`) is a new region, not a typo.
        let area = |r: &str| {
            r.rsplit_once('-')
                .map(|(a, _)| a.to_string())
                .unwrap_or_default()
        };
        let known_area = KNOWN_REGIONS.iter().any(|r| area(r) == area(s));
        let hint = if known_area {
            None
        } else {
            did_you_mean(s, KNOWN_REGIONS.iter().copied())
        };
        match hint {
            Some(h) if h != s => Err(format!("unknown region `{s}`; did you mean `{h}`?")),
            _ if shaped => Ok(Region(s.to_string())),
            _ => Err(format!("`{s}` is not a region name such as `us-east-1`")),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A 12-digit AWS account id.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct AccountId(String);

impl AccountId {
    pub fn parse(s: &str) -> Result<AccountId, String> {
        if s.len() == 12 && s.bytes().all(|b| b.is_ascii_digit()) {
            Ok(AccountId(s.to_string()))
        } else {
            Err(format!("`{s}` is not an AWS account id (12 digits)"))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Matches `text` against one of the fixed patterns of this module, compiled once.
pub fn regex_is_match(pattern: &'static str, text: &str) -> bool {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock, PoisonError};
    static CACHE: OnceLock<Mutex<HashMap<&'static str, Option<regex::Regex>>>> = OnceLock::new();
    let mut cache = CACHE
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    cache
        .entry(pattern)
        .or_insert_with(|| regex::Regex::new(pattern).ok())
        .as_ref()
        .is_some_and(|re| re.is_match(text))
}

/// Checks for the shapes of AWS identifiers. Each returns what is wrong, for the user.
pub mod shape {
    use super::regex_is_match;

    fn check(ok: bool, what: &str, value: &str, example: &str) -> Result<(), String> {
        if ok {
            Ok(())
        } else {
            Err(format!("`{value}` is not {what} (e.g. `{example}`)"))
        }
    }

    pub fn ami_id(v: &str) -> Result<(), String> {
        check(
            regex_is_match(r"^ami-([0-9a-f]{8}|[0-9a-f]{17})$", v),
            "an AMI id",
            v,
            "ami-0123456789abcdef0",
        )
    }
    pub fn subnet_id(v: &str) -> Result<(), String> {
        check(
            regex_is_match(r"^subnet-([0-9a-f]{8}|[0-9a-f]{17})$", v),
            "a subnet id",
            v,
            "subnet-0123456789abcdef0",
        )
    }
    pub fn security_group_id(v: &str) -> Result<(), String> {
        check(
            regex_is_match(r"^sg-([0-9a-f]{8}|[0-9a-f]{17})$", v),
            "a security group id",
            v,
            "sg-0123456789abcdef0",
        )
    }
    pub fn launch_template_id(v: &str) -> Result<(), String> {
        check(
            regex_is_match(r"^lt-[0-9a-f]{17}$", v),
            "a launch template id",
            v,
            "lt-0123456789abcdef0",
        )
    }
    pub fn instance_type(v: &str) -> Result<(), String> {
        check(
            regex_is_match(r"^[a-z][a-z0-9-]*\.[a-z0-9]+$", v),
            "an instance type",
            v,
            "t3.micro",
        )
    }
    pub fn organization_arn(v: &str) -> Result<(), String> {
        check(
            regex_is_match(
                r"^arn:aws[a-z-]*:organizations::\d{12}:organization/o-[a-z0-9]{10,32}$",
                v,
            ),
            "an organization ARN",
            v,
            "arn:aws:organizations::123456789012:organization/o-abcdefghij",
        )
    }
    pub fn organizational_unit_arn(v: &str) -> Result<(), String> {
        check(
            regex_is_match(
                r"^arn:aws[a-z-]*:organizations::\d{12}:ou/o-[a-z0-9]{10,32}/ou-[0-9a-z]{4,32}-[a-z0-9]{8,32}$",
                v,
            ),
            "an organizational unit ARN",
            v,
            "arn:aws:organizations::123456789012:ou/o-abcdefghij/ou-ab12-cdefgh34",
        )
    }
    pub fn kms_key(v: &str) -> Result<(), String> {
        let ok = regex_is_match(
            r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$",
            v,
        ) || regex_is_match(r"^mrk-[0-9a-f]{32}$", v)
            || regex_is_match(r"^alias/[a-zA-Z0-9/_-]+$", v)
            || regex_is_match(
                r"^arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(key/[0-9a-f-]+|key/mrk-[0-9a-f]+|alias/[a-zA-Z0-9/_-]+)$",
                v,
            );
        check(ok, "a KMS key id, alias or ARN", v, "alias/aws/ebs")
    }
    pub fn instance_profile(v: &str) -> Result<(), String> {
        let ok = regex_is_match(r"^[\w+=,.@-]{1,128}$", v)
            || regex_is_match(
                r"^arn:aws[a-z-]*:iam::\d{12}:instance-profile/[\w+=,.@/-]+$",
                v,
            );
        check(ok, "an instance profile name or ARN", v, "kiln-builder")
    }
    pub fn ssm_parameter_name(v: &str) -> Result<(), String> {
        let ok = v.len() <= 2048
            && regex_is_match(r"^/?[a-zA-Z0-9_.\-]+(/[a-zA-Z0-9_.\-]+)*$", v)
            && !v
                .to_ascii_lowercase()
                .trim_start_matches('/')
                .starts_with("ssm");
        check(ok, "an SSM parameter name", v, "/images/web-base/latest")
    }
    pub fn topic_arn(v: &str) -> Result<(), String> {
        check(
            regex_is_match(r"^arn:aws[a-z-]*:sns:[a-z0-9-]+:\d{12}:[\w-]{1,256}$", v),
            "an SNS topic ARN",
            v,
            "arn:aws:sns:us-east-1:123456789012:kiln",
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_known_new_and_misspelt() {
        assert!(Region::parse("eu-west-1").is_ok());
        assert!(
            Region::parse("ap-southeast-9").is_ok(),
            "a new region of the right shape is accepted"
        );
        assert_eq!(
            Region::parse("us-esat-1").unwrap_err(),
            "unknown region `us-esat-1`; did you mean `us-east-1`?"
        );
        assert!(Region::parse("Virginia").is_err());
    }

    #[test]
    fn accounts_and_arns() {
        assert!(AccountId::parse("123456789012").is_ok());
        assert!(AccountId::parse("12345678901").is_err());
        assert!(shape::organization_arn(
            "arn:aws:organizations::123456789012:organization/o-abcdefghij"
        )
        .is_ok());
        assert!(shape::organizational_unit_arn(
            "arn:aws:organizations::123456789012:ou/o-abcdefghij/ou-ab12-cdefgh34"
        )
        .is_ok());
        assert!(shape::organizational_unit_arn(
            "arn:aws:organizations::123456789012:organization/o-abcdefghij"
        )
        .is_err());
        assert!(shape::ssm_parameter_name(
            "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-x86_64"
        )
        .is_ok());
        assert!(shape::ssm_parameter_name("/ssm/x").is_err());
    }
}
