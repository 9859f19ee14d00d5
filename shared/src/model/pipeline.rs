//! The pipeline file: one YAML file per pipeline with the recipe (parent image, components,
//! tests), the infrastructure, the distribution, the schedule and the lifecycle.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::component::{self, Document};

/// A pipeline definition as written by the user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
#[schemars(title = "kiln pipeline")]
pub struct Pipeline {
    /// Letters, digits, `-` and `_`, starting with a letter or digit; at most 128 characters.
    #[schemars(regex(pattern = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,127}$"))]
    pub name: String,
    pub description: Option<String>,
    /// Semantic version `x.y.z` of this definition; each build gets `x.y.z/n`.
    pub version: String,
    /// The image the builder starts from: exactly one of `ami`, `ssmParameter`, `filter`, `local`.
    pub parent: Parent,
    /// Customizations, run in order on the builder (phases build and validate).
    #[schemars(length(min = 1))]
    pub components: Vec<ComponentRef>,
    /// Tests, run on a fresh instance of the new image (phase test).
    #[serde(default)]
    pub tests: Tests,
    /// Where components run and keep their files on the instance.
    #[serde(default = "default_working_directory")]
    pub working_directory: String,
    #[serde(default)]
    pub block_devices: Vec<BlockDevice>,
    /// A user-data script for the builder instance.
    pub user_data: Option<String>,
    #[serde(default)]
    pub infrastructure: Infrastructure,
    /// Target regions. The image is built in `infrastructure.region`, or in the first region here.
    #[schemars(length(min = 1))]
    pub distribution: Vec<Distribution>,
    pub schedule: Option<Schedule>,
    pub lifecycle: Option<Lifecycle>,
    #[serde(default)]
    pub timeouts: Timeouts,
    /// What the builder removes before the snapshot, as Image Builder's sanitize step does:
    /// `true` (the default: every item), `false`, or a list of items. kiln's own files (agent,
    /// documents, parameters, logs) are removed always.
    #[serde(default)]
    pub sanitize: Sanitize,
}

/// One kind of thing the builder leaves that no image should carry.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema,
)]
#[serde(rename_all = "kebab-case")]
pub enum SanitizeItem {
    /// `/etc/ssh/ssh_host_*`: every instance of the image would share the builder's host keys.
    SshHostKeys,
    /// `authorized_keys` of root and of every user in `/home`: the builder's key pair.
    AuthorizedKeys,
    /// cloud-init's per-instance state and logs, so it runs again on each new instance.
    CloudInit,
    /// `/etc/machine-id` emptied (systemd makes a new one at first boot), `/var/lib/dbus/machine-id`.
    MachineId,
    /// Shell, Python, less, vim, MySQL and PostgreSQL histories of root and of every user.
    ShellHistory,
    /// The SSM agent's state of the builder (`/var/lib/amazon/ssm/i-*`) and its logs.
    SsmAgent,
    /// The system's login, audit and boot logs emptied, the journal removed.
    Logs,
    /// DHCP leases of the builder's network interfaces.
    DhcpLeases,
    /// What `/tmp` and `/var/tmp` hold.
    Tmp,
}

impl SanitizeItem {
    pub const ALL: [SanitizeItem; 9] = [
        SanitizeItem::SshHostKeys,
        SanitizeItem::AuthorizedKeys,
        SanitizeItem::CloudInit,
        SanitizeItem::MachineId,
        SanitizeItem::ShellHistory,
        SanitizeItem::SsmAgent,
        SanitizeItem::Logs,
        SanitizeItem::DhcpLeases,
        SanitizeItem::Tmp,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            SanitizeItem::SshHostKeys => "ssh-host-keys",
            SanitizeItem::AuthorizedKeys => "authorized-keys",
            SanitizeItem::CloudInit => "cloud-init",
            SanitizeItem::MachineId => "machine-id",
            SanitizeItem::ShellHistory => "shell-history",
            SanitizeItem::SsmAgent => "ssm-agent",
            SanitizeItem::Logs => "logs",
            SanitizeItem::DhcpLeases => "dhcp-leases",
            SanitizeItem::Tmp => "tmp",
        }
    }

    /// The name as the pipeline file spells it.
    pub fn parse(name: &str) -> Result<SanitizeItem, String> {
        SanitizeItem::ALL
            .into_iter()
            .find(|i| i.as_str() == name)
            .ok_or_else(|| {
                let all: Vec<&str> = SanitizeItem::ALL.iter().map(|i| i.as_str()).collect();
                format!(
                    "unknown sanitize item `{name}` (allowed: {})",
                    all.join(", ")
                )
            })
    }

    /// Comma-separated, as the agent's `--sanitize` takes them.
    pub fn list(items: &[SanitizeItem]) -> String {
        items
            .iter()
            .map(|i| i.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The items the builder sanitizes, in the order of [`SanitizeItem::ALL`]. Written `true`,
/// `false` or as a list; kept as the list.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, JsonSchema)]
#[serde(transparent)]
pub struct Sanitize(#[schemars(with = "SanitizeSchema")] pub Vec<SanitizeItem>);

/// How `sanitize` may be written (for the JSON schema).
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum SanitizeSchema {
    /// `true`: every item; `false`: none.
    All(bool),
    /// These items only.
    Only(Vec<SanitizeItem>),
}

impl Default for Sanitize {
    fn default() -> Self {
        Sanitize(SanitizeItem::ALL.to_vec())
    }
}

impl<'de> Deserialize<'de> for Sanitize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = Sanitize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("true, false or a list of sanitize items")
            }
            fn visit_bool<E: serde::de::Error>(self, all: bool) -> Result<Sanitize, E> {
                Ok(if all {
                    Sanitize::default()
                } else {
                    Sanitize(Vec::new())
                })
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                mut seq: A,
            ) -> Result<Sanitize, A::Error> {
                let mut items = Vec::new();
                while let Some(item) = seq.next_element::<SanitizeItem>()? {
                    if !items.contains(&item) {
                        items.push(item);
                    }
                }
                items.sort();
                Ok(Sanitize(items))
            }
        }
        d.deserialize_any(V)
    }
}

fn default_working_directory() -> String {
    "/tmp".into()
}

/// Where the parent image comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub enum Parent {
    /// A fixed AMI id.
    Ami(String),
    /// An SSM parameter holding an AMI id, read at build time (e.g. `/aws/service/…`).
    SsmParameter(String),
    /// The most recent image matching owners, name pattern and architecture.
    Filter(ParentFilter),
    /// An image in the embedded image store (`kiln image list`).
    Local(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ParentFilter {
    /// `self`, `amazon`, `aws-marketplace` or account ids.
    #[schemars(length(min = 1))]
    pub owners: Vec<String>,
    /// Image name pattern; `*` and `?` are wildcards.
    pub name: String,
    pub architecture: Option<Architecture>,
}

/// Whether `name` matches `pattern` (`*` any run, `?` one character), as EC2's `name` filter
/// matches a `parent.filter.name`.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n): (Vec<char>, Vec<char>) = (pattern.chars().collect(), name.chars().collect());
    let (mut pi, mut ni, mut star, mut mark) = (0, 0, None, 0);
    while ni < n.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum Architecture {
    #[serde(rename = "x86_64")]
    X86_64,
    #[serde(rename = "arm64")]
    Arm64,
}

impl Architecture {
    /// As EC2 names it (an image's `architecture`).
    pub fn as_str(self) -> &'static str {
        match self {
            Architecture::X86_64 => "x86_64",
            Architecture::Arm64 => "arm64",
        }
    }
}

/// A component: a document file (relative to the pipeline file) or an inline document.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ComponentRef {
    pub path: Option<String>,
    pub inline: Option<Document>,
    /// Values for the document's parameters.
    #[serde(default)]
    pub parameters: BTreeMap<String, String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Tests {
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Instance type of the test instance; the first of `infrastructure.instanceTypes` by default.
    pub instance_type: Option<String>,
    #[serde(default)]
    pub components: Vec<ComponentRef>,
}

impl Default for Tests {
    fn default() -> Self {
        Tests {
            enabled: true,
            instance_type: None,
            components: Vec::new(),
        }
    }
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BlockDevice {
    #[serde(default = "default_device")]
    pub device_name: String,
    /// GiB.
    #[schemars(range(min = 1, max = 65536))]
    pub volume_size: Option<u32>,
    pub volume_type: Option<VolumeType>,
    pub iops: Option<u32>,
    /// MiB/s, gp3 only.
    pub throughput: Option<u32>,
    #[serde(default = "yes")]
    pub encrypted: bool,
    pub kms_key_id: Option<String>,
    #[serde(default = "yes")]
    pub delete_on_termination: bool,
}

fn default_device() -> String {
    "/dev/xvda".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum VolumeType {
    Gp2,
    Gp3,
    Io1,
    Io2,
    St1,
    Sc1,
    Standard,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Infrastructure {
    /// The region the builder runs in; the first distribution region by default.
    pub region: Option<String>,
    /// Tried in order when EC2 has no capacity for one.
    #[serde(default = "default_instance_types")]
    #[schemars(length(min = 1))]
    pub instance_types: Vec<String>,
    pub subnet_id: Option<String>,
    #[serde(default)]
    pub security_group_ids: Vec<String>,
    /// Needs SSM core permissions and read access to the artifacts bucket.
    pub instance_profile: Option<String>,
    pub key_pair: Option<String>,
    /// Terminate the builder when the build fails (set false to debug a failed build).
    #[serde(default = "yes")]
    pub terminate_on_failure: bool,
    #[serde(default)]
    pub imdsv2: Imdsv2,
    /// A public IP on the builder and test instances; unset, the subnet's own setting, as EC2
    /// and Packer do (a default VPC's subnets give one: that is how an instance there reaches
    /// SSM without a NAT gateway or VPC endpoints). `false` in a subnet whose only way out is an
    /// internet gateway leaves the SSM agent unable to register.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub associate_public_ip: Option<bool>,
    /// Tags on every instance kiln launches (besides `kiln:*`).
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Embedded mode: `private` (the default) gives the sandbox its own network namespace with
    /// outbound access through user-mode networking (slirp4netns), link-local, private and the
    /// host's own addresses refused unless `allow` names them; `host` shares the machine's
    /// interfaces, by explicit choice only; `none` gives it loopback alone.
    #[serde(default)]
    #[schemars(with = "NetworkSchema")]
    pub network: NetworkPolicy,
    /// Embedded mode: what one instance may use, enforced by a cgroup (`{pids, memory}`, 4096
    /// processes and 4 GiB by default); `none` runs it unbounded, by explicit choice only.
    #[serde(default)]
    #[schemars(with = "LimitsSchema")]
    pub limits: Limits,
    /// Embedded mode: run the instance WITHOUT its sandbox posture — every capability, no
    /// seccomp filter, /proc writable, device nodes usable. Only for trusted components that
    /// must reach the kernel (load modules, mount file systems); anything they run owns the host.
    #[serde(default)]
    pub privileged: bool,
    pub sns_topic_arn: Option<String>,
}

impl Default for Infrastructure {
    fn default() -> Self {
        Infrastructure {
            region: None,
            instance_types: default_instance_types(),
            subnet_id: None,
            security_group_ids: Vec::new(),
            instance_profile: None,
            key_pair: None,
            terminate_on_failure: true,
            imdsv2: Imdsv2::Required,
            associate_public_ip: None,
            tags: BTreeMap::new(),
            network: NetworkPolicy::default(),
            limits: Limits::default(),
            privileged: false,
            sns_topic_arn: None,
        }
    }
}

fn default_instance_types() -> Vec<String> {
    vec!["t3.small".into()]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Imdsv2 {
    #[default]
    Required,
    Optional,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Network {
    /// Its own network namespace; outbound through slirp4netns, no way in, the host's
    /// loopback out of reach.
    #[default]
    Private,
    /// The machine's own interfaces (and whatever listens on its loopback).
    Host,
    /// Loopback only.
    None,
}

impl Network {
    pub fn as_str(self) -> &'static str {
        match self {
            Network::Private => "private",
            Network::Host => "host",
            Network::None => "none",
        }
    }

    /// The name as the pipeline file spells it.
    pub fn parse(name: &str) -> Result<Network, String> {
        [Network::Private, Network::Host, Network::None]
            .into_iter()
            .find(|n| n.as_str() == name)
            .ok_or_else(|| format!("unknown network `{name}` (private, host or none)"))
    }
}

/// `infrastructure.network`: a mode, and for `private` the destinations let through its
/// default-deny (written `private`, `host`, `none`, or `{mode: private, allow: [...]}`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkPolicy {
    pub mode: Network,
    /// CIDRs (`10.1.2.0/24`, `fd00::/8`, an address alone) and `host:port` (`10.1.2.3:443`,
    /// `[fd00::1]:443`, `mirror.internal:8080`): reachable from a `private` instance although
    /// their addresses are refused by default.
    pub allow: Vec<String>,
}

/// How `network` may be written (for the JSON schema).
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum NetworkSchema {
    Mode(Network),
    Policy(NetworkFields),
}

#[derive(Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
struct NetworkFields {
    #[serde(default)]
    mode: Network,
    /// Destinations let through the default-deny: CIDR or host:port.
    #[serde(default)]
    allow: Vec<String>,
}

impl Serialize for NetworkPolicy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if self.allow.is_empty() {
            self.mode.serialize(s)
        } else {
            NetworkFields {
                mode: self.mode,
                allow: self.allow.clone(),
            }
            .serialize(s)
        }
    }
}

impl<'de> Deserialize<'de> for NetworkPolicy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Mode(Network),
            Policy(NetworkFields),
        }
        Ok(match Written::deserialize(d)? {
            Written::Mode(mode) => NetworkPolicy {
                mode,
                allow: Vec::new(),
            },
            Written::Policy(f) => NetworkPolicy {
                mode: f.mode,
                allow: f.allow,
            },
        })
    }
}

/// One `allow` entry of a private network, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    /// Every port of these addresses.
    Net(std::net::IpAddr, u8),
    /// One port of an address or of what a name resolves to when the instance starts.
    Port(String, u16),
}

impl Allowed {
    /// `10.0.0.0/8`, `10.1.2.3`, `fd00::/8`, `10.1.2.3:443`, `[fd00::1]:443`, `name:443`.
    pub fn parse(text: &str) -> Result<Allowed, String> {
        let bad = |why: &str| {
            format!("`{text}` is not a destination to allow ({why}): write a CIDR (10.1.2.0/24, fd00::/8) or host:port (10.1.2.3:443, [fd00::1]:443, mirror.internal:8080)")
        };
        if let Some((addr, bits)) = text.split_once('/') {
            let addr: std::net::IpAddr = addr.parse().map_err(|_| bad("not an address"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| bad(&format!("the prefix length must be 0 to {max}")))?;
            return Ok(Allowed::Net(addr, bits));
        }
        if let Ok(addr) = text.parse::<std::net::IpAddr>() {
            return Ok(Allowed::Net(addr, if addr.is_ipv4() { 32 } else { 128 }));
        }
        if let Ok(sock) = text.parse::<std::net::SocketAddr>() {
            return Ok(Allowed::Port(sock.ip().to_string(), sock.port()));
        }
        let (host, port) = text.rsplit_once(':').ok_or_else(|| bad("no port"))?;
        let port: u16 = port
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| bad("the port must be 1 to 65535"))?;
        let name_ok = !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|l| {
                !l.is_empty()
                    && l.len() <= 63
                    && !l.starts_with('-')
                    && l.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            });
        if !name_ok {
            return Err(bad("not an address or host name"));
        }
        Ok(Allowed::Port(host.to_string(), port))
    }
}

/// `infrastructure.limits`: a cgroup's bounds, or none by explicit choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limits {
    /// No cgroup: the instance can use all of the machine's memory and processes.
    None,
    Bounded {
        /// The most processes (and threads) at once.
        pids: u64,
        /// The most memory, in bytes.
        memory: u64,
    },
}

impl Limits {
    pub const DEFAULT_PIDS: u64 = 4096;
    pub const DEFAULT_MEMORY: u64 = 4 << 30;
}

impl Default for Limits {
    fn default() -> Self {
        Limits::Bounded {
            pids: Limits::DEFAULT_PIDS,
            memory: Limits::DEFAULT_MEMORY,
        }
    }
}

/// How `limits` may be written (for the JSON schema).
#[derive(JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum LimitsSchema {
    /// `none`: no cgroup, by explicit choice.
    Unbounded(NoLimits),
    Bounded(LimitFields),
}

#[derive(JsonSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)]
enum NoLimits {
    None,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct LimitFields {
    /// The most processes at once (4096 by default).
    #[schemars(range(min = 16))]
    pids: Option<u64>,
    /// The most memory: bytes, or a size with KiB, MiB or GiB (`256MiB`); 4GiB by default.
    memory: Option<MemorySize>,
}

#[derive(Deserialize, JsonSchema)]
#[serde(untagged)]
#[allow(dead_code)]
enum MemorySize {
    Bytes(u64),
    /// A size with its unit: `256MiB`, `4GiB`, `65536KiB`.
    Text(#[schemars(regex(pattern = r"^[0-9]+ ?(B|KiB|MiB|GiB)?$"))] String),
}

/// `256MiB`, `4GiB`, `65536KiB` or a number of bytes.
pub fn parse_memory(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let (number, unit) = t
        .find(|c: char| !c.is_ascii_digit())
        .map(|i| t.split_at(i))
        .unwrap_or((t, ""));
    let scale: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        other => {
            return Err(format!(
                "memory `{text}`: unknown unit `{other}` (KiB, MiB or GiB)"
            ))
        }
    };
    number
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("memory `{text}` is not a size (e.g. 256MiB, 4GiB)"))
}

/// The least memory an instance can start in (init, the agent, a shell).
pub const MIN_MEMORY: u64 = 16 << 20;

impl Serialize for Limits {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        match self {
            Limits::None => s.serialize_str("none"),
            Limits::Bounded { pids, memory } => {
                let mut m = s.serialize_map(Some(2))?;
                m.serialize_entry("pids", pids)?;
                m.serialize_entry("memory", memory)?;
                m.end()
            }
        }
    }
}

impl<'de> Deserialize<'de> for Limits {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Written {
            Word(String),
            Fields(LimitFields),
        }
        match Written::deserialize(d)? {
            Written::Word(w) if w == "none" => Ok(Limits::None),
            Written::Word(w) => Err(D::Error::custom(format!(
                "unknown limits `{w}` (`none`, or {{pids, memory}})"
            ))),
            Written::Fields(f) => {
                let memory = match f.memory {
                    None => Limits::DEFAULT_MEMORY,
                    Some(MemorySize::Bytes(b)) => b,
                    Some(MemorySize::Text(t)) => parse_memory(&t).map_err(D::Error::custom)?,
                };
                Ok(Limits::Bounded {
                    pids: f.pids.unwrap_or(Limits::DEFAULT_PIDS),
                    memory,
                })
            }
        }
    }
}

/// One target region.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Distribution {
    pub region: String,
    /// Image name; may use `{{ kiln:pipeline }}`, `{{ kiln:version }}`, `{{ kiln:buildNumber }}`,
    /// `{{ kiln:buildDate }}`.
    #[serde(default = "default_ami_name")]
    pub ami_name: String,
    pub description: Option<String>,
    pub kms_key_id: Option<String>,
    pub launch_permission: Option<LaunchPermission>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// An SSM parameter that receives the new image id in this region.
    pub ssm_parameter: Option<String>,
    /// Launch templates that get a new version using the new image.
    #[serde(default)]
    pub launch_templates: Vec<LaunchTemplateRef>,
}

pub const DEFAULT_AMI_NAME: &str =
    "{{ kiln:pipeline }}-{{ kiln:version }}-{{ kiln:buildNumber }}-{{ kiln:buildDate }}";

fn default_ami_name() -> String {
    DEFAULT_AMI_NAME.into()
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchPermission {
    #[serde(default)]
    pub accounts: Vec<String>,
    #[serde(default)]
    pub organization_arns: Vec<String>,
    #[serde(default)]
    pub organizational_unit_arns: Vec<String>,
    #[serde(default)]
    pub public: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LaunchTemplateRef {
    pub id: String,
    /// Make the new version the template's default.
    #[serde(default)]
    pub set_default_version: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Schedule {
    /// EventBridge cron: `cron(minutes hours day-of-month month day-of-week year)`.
    pub cron: Option<String>,
    /// IANA time zone the cron expression is read in.
    #[serde(default = "default_timezone")]
    pub timezone: String,
    #[serde(default)]
    pub start_condition: StartCondition,
    /// Disable the schedule after this many consecutive failed builds.
    #[schemars(range(min = 1))]
    pub disable_after_failures: Option<u32>,
}

fn default_timezone() -> String {
    "UTC".into()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum StartCondition {
    /// Build every time.
    Always,
    /// Skip the build when nothing that determines the image changed since the last available one.
    #[default]
    OnChange,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Lifecycle {
    #[schemars(range(min = 1))]
    pub keep_latest: Option<u32>,
    #[schemars(range(min = 1))]
    pub deprecate_after_days: Option<u32>,
    #[schemars(range(min = 1))]
    pub delete_after_days: Option<u32>,
    /// Images with all of these tags are never deprecated or deleted.
    #[serde(default)]
    pub exclude_tags: BTreeMap<String, String>,
}

/// Minutes each stage may take before the build fails with `Kiln.Timeout`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    #[serde(default = "t15")]
    #[schemars(range(min = 1, max = 1440))]
    pub launch_minutes: u32,
    #[serde(default = "t120")]
    #[schemars(range(min = 1, max = 1440))]
    pub customize_minutes: u32,
    #[serde(default = "t120")]
    #[schemars(range(min = 1, max = 1440))]
    pub snapshot_minutes: u32,
    #[serde(default = "t60")]
    #[schemars(range(min = 1, max = 1440))]
    pub test_minutes: u32,
    #[serde(default = "t120")]
    #[schemars(range(min = 1, max = 1440))]
    pub distribute_minutes: u32,
}

fn t15() -> u32 {
    15
}
fn t60() -> u32 {
    60
}
fn t120() -> u32 {
    120
}

impl Default for Timeouts {
    fn default() -> Self {
        Timeouts {
            launch_minutes: 15,
            customize_minutes: 120,
            snapshot_minutes: 120,
            test_minutes: 60,
            distribute_minutes: 120,
        }
    }
}

impl Pipeline {
    pub fn start_condition(&self) -> StartCondition {
        self.schedule
            .as_ref()
            .map(|s| s.start_condition)
            .unwrap_or_default()
    }

    /// The region the image is built in.
    pub fn home_region(&self) -> &str {
        self.infrastructure
            .region
            .as_deref()
            .unwrap_or_else(|| self.distribution[0].region.as_str())
    }
}

/// Where a component came from.
#[derive(Debug, Clone, PartialEq)]
pub enum Origin {
    File(PathBuf),
    Inline { pipeline: PathBuf, index: usize },
}

/// A component ready to run: its validated document and the parameter values to run it with.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedComponent {
    pub origin: Origin,
    pub document: component::Loaded,
    pub parameters: BTreeMap<String, String>,
}

impl LoadedComponent {
    /// A short name for reports: the document's name, else the file name.
    pub fn display_name(&self) -> String {
        if let Some(n) = &self.document.document.name {
            return n.clone();
        }
        match &self.origin {
            Origin::File(p) => p
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default(),
            Origin::Inline { index, .. } => format!("inline-{index}"),
        }
    }
}

/// A validated pipeline with its components loaded.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedPipeline {
    pub file: PathBuf,
    pub pipeline: Pipeline,
    pub components: Vec<LoadedComponent>,
    pub tests: Vec<LoadedComponent>,
}

/// The variables allowed in image name templates.
pub const NAME_VARIABLES: [&str; 4] = [
    "kiln:pipeline",
    "kiln:version",
    "kiln:buildNumber",
    "kiln:buildDate",
];

/// Values for an image name template.
#[derive(Debug, Clone)]
pub struct NameContext<'a> {
    pub pipeline: &'a str,
    pub version: &'a str,
    pub build_number: u32,
    /// UTC, formatted `YYYYMMDDhhmmss`.
    pub build_date: &'a str,
}

/// Expands an image name template. Unknown variables are errors that name them.
pub fn render_name(template: &str, ctx: &NameContext<'_>) -> Result<String, String> {
    let mut out = String::new();
    let mut rest = template;
    while let Some(open) = rest.find("{{") {
        out.push_str(&rest[..open]);
        let after = &rest[open + 2..];
        let close = after.find("}}").ok_or("`{{` without a closing `}}`")?;
        let var = after[..close].trim();
        match var {
            "kiln:pipeline" => out.push_str(ctx.pipeline),
            "kiln:version" => out.push_str(ctx.version),
            "kiln:buildNumber" => out.push_str(&ctx.build_number.to_string()),
            "kiln:buildDate" => out.push_str(ctx.build_date),
            other => {
                let hint = crate::diag::did_you_mean(other, NAME_VARIABLES)
                    .map(|s| format!("; did you mean `{s}`?"))
                    .unwrap_or_default();
                return Err(format!(
                    "unknown variable `{{{{ {other} }}}}` in the image name{hint}"
                ));
            }
        }
        rest = &after[close + 2..];
    }
    out.push_str(rest);
    Ok(out)
}

/// Checks an expanded image name against EC2's rules for AMI names.
pub fn check_image_name(name: &str) -> Result<(), String> {
    if !(3..=128).contains(&name.chars().count()) {
        return Err(format!(
            "the image name `{name}` must be 3 to 128 characters long"
        ));
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || "()[] ./-'@_".contains(*c)))
    {
        return Err(format!(
            "the image name may only contain letters, digits, spaces and ()[]./-'@_; found `{bad}`"
        ));
    }
    Ok(())
}

/// Resolves a component path relative to the pipeline file.
pub fn component_path(pipeline_file: &Path, path: &str) -> PathBuf {
    pipeline_file.parent().unwrap_or(Path::new(".")).join(path)
}

#[cfg(test)]
mod egress_and_limits_tests {
    use super::*;

    const HEAD: &str = "name: p\nversion: 1.0.0\nparent:\n  local: base\ninfrastructure:\n";
    const TAIL: &str = "components:\n  - inline:\n      name: c\n      schemaVersion: 1.0\n      phases:\n        - name: build\n          steps:\n            - name: s\n              action: ExecuteBash\n              inputs:\n                commands: [\"true\"]\ndistribution:\n  - region: us-east-1\n";

    fn load(infrastructure: &str) -> Result<Infrastructure, String> {
        crate::model::load_str(
            Path::new("p.yaml"),
            &format!("{HEAD}{infrastructure}{TAIL}"),
        )
        .map(|l| l.pipeline.infrastructure)
        .map_err(|d| d.to_string())
    }

    #[test]
    fn network_keeps_its_short_forms_and_takes_an_allow_list() {
        // GIVEN the short form WHEN loaded THEN a mode without openings
        let i = load("  network: host\n").expect("host");
        assert_eq!(i.network.mode, Network::Host);
        assert!(i.network.allow.is_empty());
        assert_eq!(
            load("  region: us-east-1\n").expect("default").network.mode,
            Network::Private
        );
        // GIVEN the long form WHEN loaded THEN its openings, each parsed
        let i = load("  network:\n    mode: private\n    allow: [10.1.2.0/24, \"10.1.2.3:443\", \"[fd00::1]:443\", \"mirror.internal:8080\"]\n").expect("allow");
        assert_eq!(i.network.allow.len(), 4);
        assert_eq!(
            Allowed::parse("[fd00::1]:443"),
            Ok(Allowed::Port("fd00::1".into(), 443))
        );
        assert_eq!(
            Allowed::parse("10.1.2.0/24"),
            Ok(Allowed::Net("10.1.2.0".parse().expect("ip"), 24))
        );
        // AND it round-trips through the record's JSON in both forms
        for n in [i.network.clone(), NetworkPolicy::default()] {
            let json = serde_json::to_value(&n).expect("json");
            assert_eq!(
                serde_json::from_value::<NetworkPolicy>(json).expect("back"),
                n
            );
        }
    }

    #[test]
    fn a_bad_allow_entry_or_limit_is_reported_at_its_line_and_column() {
        // GIVEN a destination with no port, a prefix too long and allow on `host`
        let err =
            load("  network:\n    mode: host\n    allow: [\"mirror.internal\", 10.0.0.0/33]\n")
                .expect_err("refused");
        // THEN each is reported at file:line:col
        assert!(
            err.contains("p.yaml:8:13") && err.contains("no port"),
            "{err}"
        );
        assert!(
            err.contains("p.yaml:8:32") && err.contains("0 to 32"),
            "{err}"
        );
        assert!(err.contains("has no default-deny"), "{err}");
        // GIVEN a memory size in an unknown unit and one too small THEN both are reported
        let err = load("  limits:\n    pids: 512\n    memory: 256MB\n").expect_err("unit");
        assert!(err.contains("p.yaml:8:13"), "{err}");
        let err = load("  limits:\n    memory: 1MiB\n").expect_err("small");
        assert!(err.contains("too little"), "{err}");
        let err = load("  limits: nothing\n").expect_err("word");
        assert!(err.contains("p.yaml:6:11"), "{err}");
    }

    #[test]
    fn limits_default_to_a_cgroups_bounds_and_none_is_explicit() {
        assert_eq!(
            load("  region: us-east-1\n").expect("default").limits,
            Limits::Bounded {
                pids: 4096,
                memory: 4 << 30
            }
        );
        assert_eq!(load("  limits: none\n").expect("none").limits, Limits::None);
        let i = load("  limits:\n    pids: 512\n    memory: 256MiB\n").expect("bounded");
        assert_eq!(
            i.limits,
            Limits::Bounded {
                pids: 512,
                memory: 256 << 20
            }
        );
        for l in [i.limits, Limits::None] {
            let json = serde_json::to_value(l).expect("json");
            assert_eq!(serde_json::from_value::<Limits>(json).expect("back"), l);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::glob_match;

    #[test]
    fn image_name_patterns_match_like_ec2_filters() {
        assert!(glob_match(
            "al2023-ami-*-x86_64",
            "al2023-ami-2023.6.2-x86_64"
        ));
        assert!(glob_match("base-?", "base-1"));
        assert!(!glob_match("base-?", "base-12"));
        assert!(glob_match("*", ""));
        assert!(!glob_match("a*b", "a-c"));
        assert!(glob_match("a*b*c", "a-b-b-c"));
    }
}
