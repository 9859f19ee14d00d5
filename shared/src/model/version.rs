//! Semantic versions `x.y.z` of pipeline definitions and build versions `x.y.z/n`.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct SemVer {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl FromStr for SemVer {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a version of the form x.y.z (e.g. 1.0.0)");
        let parts: Vec<&str> = s.split('.').collect();
        let [a, b, c] = parts.as_slice() else {
            return Err(bad());
        };
        let num = |p: &str| -> Result<u32, String> {
            if p.is_empty()
                || !p.bytes().all(|b| b.is_ascii_digit())
                || (p.len() > 1 && p.starts_with('0'))
            {
                return Err(bad());
            }
            p.parse().map_err(|_| bad())
        };
        Ok(SemVer {
            major: num(a)?,
            minor: num(b)?,
            patch: num(c)?,
        })
    }
}

impl fmt::Display for SemVer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// A build of a pipeline version: `1.2.0/3` is the third build of version 1.2.0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BuildVersion {
    pub version: SemVer,
    pub build: u32,
}

impl FromStr for BuildVersion {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (v, n) = s
            .split_once('/')
            .ok_or_else(|| format!("`{s}` is not a build version x.y.z/n"))?;
        let build = n
            .parse()
            .ok()
            .filter(|n| *n >= 1)
            .ok_or_else(|| format!("`{s}`: the build number is a whole number from 1"))?;
        Ok(BuildVersion {
            version: v.parse()?,
            build,
        })
    }
}

impl fmt::Display for BuildVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.version, self.build)
    }
}

macro_rules! string_serde {
    ($t:ty) => {
        impl Serialize for $t {
            fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                s.collect_str(self)
            }
        }
        impl<'de> Deserialize<'de> for $t {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                String::deserialize(d)?
                    .parse()
                    .map_err(serde::de::Error::custom)
            }
        }
    };
}
string_serde!(SemVer);
string_serde!(BuildVersion);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_orders_versions() {
        let a: SemVer = "1.2.10".parse().expect("valid");
        let b: SemVer = "1.10.0".parse().expect("valid");
        assert!(a < b);
        for bad in ["1.2", "1.2.3.4", "01.2.3", "1.a.3", "", "1..3", "-1.2.3"] {
            assert!(bad.parse::<SemVer>().is_err(), "{bad}");
        }
        let bv: BuildVersion = "1.2.0/3".parse().expect("valid");
        assert_eq!(bv.to_string(), "1.2.0/3");
        assert!("1.2.0/0".parse::<BuildVersion>().is_err());
    }
}
