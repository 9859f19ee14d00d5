//! The AWSTOE action modules: their names, the platforms they run on, and the shape of their
//! `inputs`. The same types check documents here and decode resolved inputs in `kiln-agent`.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Values whose type is only known once `{{ variables }}` are resolved: `"true"` fills a bool,
/// `"30"` a number, as AWSTOE reads them.
pub mod flex {
    use serde::{Deserialize, Deserializer};
    use serde_json::Value;

    pub fn opt_bool<'de, D: Deserializer<'de>>(d: D) -> Result<Option<bool>, D::Error> {
        match Option::<Value>::deserialize(d)? {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Bool(b)) => Ok(Some(b)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("true") => Ok(Some(true)),
            Some(Value::String(s)) if s.eq_ignore_ascii_case("false") => Ok(Some(false)),
            Some(other) => Err(serde::de::Error::custom(format!(
                "expected true or false, found {other}"
            ))),
        }
    }

    pub fn opt_u32<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u32>, D::Error> {
        match Option::<Value>::deserialize(d)? {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => n
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .map(Some)
                .ok_or_else(|| {
                    serde::de::Error::custom(format!("expected a whole number, found {n}"))
                }),
            Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| {
                serde::de::Error::custom(format!("expected a whole number, found `{s}`"))
            }),
            Some(other) => Err(serde::de::Error::custom(format!(
                "expected a whole number, found {other}"
            ))),
        }
    }
}

/// A scalar that AWSTOE accepts either as a string or a number (`permissions: 0755` or `'0755'`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum StrOrInt {
    Int(i64),
    Str(String),
}

impl StrOrInt {
    pub fn text(&self) -> String {
        match self {
            StrOrInt::Int(i) => i.to_string(),
            StrOrInt::Str(s) => s.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBash {
    /// Shell lines, run in order by one bash process.
    #[schemars(length(min = 1))]
    pub commands: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteBinary {
    pub path: String,
    #[serde(default)]
    pub arguments: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ExecutePowerShell {
    pub commands: Option<Vec<String>>,
    pub file: Option<String>,
    pub execution_policy: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DocumentParameter {
    pub name: String,
    pub value: StrOrInt,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecuteDocument {
    /// A local path, an S3 URL or a component ARN.
    pub document: String,
    #[serde(rename = "document-s3-bucket-owner")]
    pub document_s3_bucket_owner: Option<StrOrInt>,
    /// Comma-separated phase names; all phases of the nested document when omitted.
    pub phases: Option<String>,
    #[serde(default)]
    pub parameters: Vec<DocumentParameter>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateOs {
    #[serde(default)]
    pub include: Vec<String>,
    #[serde(default)]
    pub exclude: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Reboot {
    #[serde(default, deserialize_with = "flex::opt_u32")]
    pub delay_seconds: Option<u32>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ChecksumAlgorithm {
    #[serde(alias = "md5")]
    MD5,
    #[serde(alias = "sha1")]
    SHA1,
    #[serde(alias = "sha256")]
    SHA256,
    #[serde(alias = "sha512")]
    SHA512,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct WebDownload {
    pub source: String,
    pub destination: String,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub overwrite: Option<bool>,
    pub checksum: Option<String>,
    pub algorithm: Option<ChecksumAlgorithm>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub ignore_certificate_errors: Option<bool>,
    /// kiln extension: download attempts before the step fails (default 3).
    #[serde(default, deserialize_with = "flex::opt_u32")]
    pub max_retries: Option<u32>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct S3Transfer {
    pub source: String,
    pub destination: String,
    pub expected_bucket_owner: Option<StrOrInt>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub overwrite: Option<bool>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub recurse: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppendFile {
    pub path: String,
    /// Nothing is appended when omitted (the file is still created).
    pub content: Option<String>,
    pub encoding: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFile {
    pub path: String,
    pub content: Option<String>,
    pub encoding: Option<String>,
    pub owner: Option<StrOrInt>,
    pub group: Option<StrOrInt>,
    pub permissions: Option<StrOrInt>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub overwrite: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateFolder {
    pub path: String,
    pub owner: Option<StrOrInt>,
    pub group: Option<StrOrInt>,
    pub permissions: Option<StrOrInt>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub overwrite: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSymlink {
    /// The link to create.
    pub path: String,
    /// What the link points at.
    pub target: String,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub force: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CopyOrMove {
    pub source: String,
    pub destination: String,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub overwrite: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Delete {
    pub path: String,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub force: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ListFiles {
    pub path: String,
    pub file_name_pattern: Option<String>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub recursive: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct ReadFile {
    pub path: String,
    pub encoding: Option<String>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub print_file_content: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetFileEncoding {
    pub path: String,
    /// UTF-8 when omitted.
    pub encoding: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetOwner {
    pub path: String,
    pub owner: StrOrInt,
    pub group: Option<StrOrInt>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub recursive: Option<bool>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetPermissions {
    pub path: String,
    pub permissions: StrOrInt,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub recursive: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum MsiReboot {
    Force,
    Allow,
    Skip,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct Msi {
    pub path: String,
    pub reboot: Option<MsiReboot>,
    pub log_options: Option<String>,
    pub log_file: Option<String>,
    pub properties: Option<BTreeMap<String, StrOrInt>>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub ignore_authenticode_signature_errors: Option<bool>,
    #[serde(default, deserialize_with = "flex::opt_bool")]
    pub allow_unsigned_installer: Option<bool>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum RegistryType {
    #[serde(rename = "BINARY")]
    Binary,
    #[serde(rename = "DWORD")]
    Dword,
    #[serde(rename = "QWORD")]
    Qword,
    #[serde(rename = "SZ")]
    Sz,
    #[serde(rename = "EXPAND_SZ")]
    ExpandSz,
    #[serde(rename = "MULTI_SZ")]
    MultiSz,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetRegistry {
    pub path: String,
    pub name: String,
    pub value: serde_json::Value,
    #[serde(rename = "type")]
    pub kind: RegistryType,
}

/// Where an action can run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Platform {
    Any,
    Windows,
}

/// How an action's `inputs` are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InputForm {
    /// A single map.
    Map,
    /// A list of maps, each one operation.
    List,
    /// A map, or nothing at all.
    OptionalMap,
    /// A comparison, as in `if` (Assert).
    Comparison,
}

/// One action module.
#[derive(Debug, Clone, Copy)]
pub struct Action {
    pub name: &'static str,
    pub platform: Platform,
    pub form: InputForm,
    schema: fn() -> schemars::Schema,
}

impl Action {
    /// The JSON Schema of one input item (the whole map, or one element of the list).
    pub fn input_schema(&self) -> schemars::Schema {
        (self.schema)()
    }

    /// The input schema ready for checking, built once per action.
    pub fn input_shape(&self) -> &'static crate::typed::Shape {
        use std::collections::HashMap;
        use std::sync::OnceLock;
        static SHAPES: OnceLock<HashMap<&'static str, crate::typed::Shape>> = OnceLock::new();
        let shapes = SHAPES.get_or_init(|| {
            ACTIONS
                .iter()
                .map(|a| (a.name, crate::typed::Shape::new(a.input_schema())))
                .collect()
        });
        &shapes[self.name]
    }
}

macro_rules! action {
    ($name:literal, $platform:ident, $form:ident, $ty:ty) => {
        Action {
            name: $name,
            platform: Platform::$platform,
            form: InputForm::$form,
            schema: || schemars::schema_for!($ty),
        }
    };
}

/// Every action module AWSTOE documents.
pub const ACTIONS: &[Action] = &[
    action!("ExecuteBash", Any, Map, ExecuteBash),
    action!("ExecuteBinary", Any, Map, ExecuteBinary),
    action!("ExecuteDocument", Any, Map, ExecuteDocument),
    action!("ExecutePowerShell", Windows, Map, ExecutePowerShell),
    action!("Assert", Any, Comparison, serde_json::Value),
    action!("UpdateOS", Any, OptionalMap, UpdateOs),
    action!("Reboot", Any, OptionalMap, Reboot),
    action!("WebDownload", Any, List, WebDownload),
    action!("S3Download", Any, List, S3Transfer),
    action!("S3Upload", Any, List, S3Transfer),
    action!("AppendFile", Any, List, AppendFile),
    action!("CreateFile", Any, List, CreateFile),
    action!("CreateFolder", Any, List, CreateFolder),
    action!("CreateSymlink", Any, List, CreateSymlink),
    action!("CopyFile", Any, List, CopyOrMove),
    action!("CopyFolder", Any, List, CopyOrMove),
    action!("MoveFile", Any, List, CopyOrMove),
    action!("MoveFolder", Any, List, CopyOrMove),
    action!("DeleteFile", Any, List, Delete),
    action!("DeleteFolder", Any, List, Delete),
    action!("ListFiles", Any, List, ListFiles),
    action!("ReadFile", Any, List, ReadFile),
    action!("SetFileEncoding", Any, List, SetFileEncoding),
    action!("SetFileOwner", Any, List, SetOwner),
    action!("SetFolderOwner", Any, List, SetOwner),
    action!("SetFilePermissions", Any, List, SetPermissions),
    action!("SetFolderPermissions", Any, List, SetPermissions),
    action!("InstallMSI", Windows, Map, Msi),
    action!("UninstallMSI", Windows, Map, Msi),
    action!("SetRegistry", Windows, List, SetRegistry),
];

pub fn find(name: &str) -> Option<&'static Action> {
    ACTIONS.iter().find(|a| a.name == name)
}
