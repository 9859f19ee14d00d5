//! Reads a pipeline file: YAML with positions → typed `Pipeline` → every semantic check, with all
//! problems (in the pipeline file and in the component documents it names) collected at once.

use std::path::Path;

use crate::component;
use crate::diag::{Collector, Diagnostics};
use crate::model::cron::Cron;
use crate::model::ids::{shape, AccountId, Region};
use crate::model::pipeline::*;
use crate::model::version::SemVer;
use crate::typed::{Options, Shape};
use crate::yaml::{Node, Seg};

fn key(k: &str) -> Seg {
    Seg::Key(k.to_string())
}

/// Loads and validates the pipeline file at `file`, with its components.
pub fn load(file: &Path) -> Result<LoadedPipeline, Diagnostics> {
    let text = crate::read_source(file)?;
    load_str(file, &text)
}

/// Validates a pipeline given as text; component paths are relative to `file`.
pub fn load_str(file: &Path, text: &str) -> Result<LoadedPipeline, Diagnostics> {
    load_checked(file, text, |_, _| {})
}

/// What a deployed stack lets its pipelines' SSM parameters be (`kiln validate --stack`), as
/// its template scopes its roles: parents are read only from AWS's public parameters and under
/// its `ImageParameterPrefix`, image ids are published only under that prefix, and the stack's
/// builder instance profile reads no parameter at all.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StackGrants {
    pub stack: String,
    /// The stack's `ImageParameterPrefix` (begins and ends with `/`).
    pub parameter_prefix: String,
}

impl StackGrants {
    /// Whether the stack's functions may read `name` as a parent.
    pub fn reads_parent(&self, name: &str) -> bool {
        name.starts_with("/aws/service/") || name.starts_with(&self.parameter_prefix)
    }

    /// Whether the stack's functions may publish an image id as `name`.
    pub fn publishes(&self, name: &str) -> bool {
        name.starts_with(&self.parameter_prefix)
    }
}

/// Loads and validates the pipeline file at `file`, and what its parameters need from the
/// deployed stack `grants` describes: each parameter the stack's roles could not read or write
/// is reported at its position.
pub fn load_for_stack(file: &Path, grants: &StackGrants) -> Result<LoadedPipeline, Diagnostics> {
    let text = crate::read_source(file)?;
    load_checked(file, &text, |p, out| check_stack_grants(p, grants, out))
}

fn load_checked(
    file: &Path,
    text: &str,
    more: impl FnOnce(&Pipeline, &mut Collector<'_>),
) -> Result<LoadedPipeline, Diagnostics> {
    let root = crate::parse_source(file, text)?;
    let mut out = Collector::new(file, &root);
    let mut others = Diagnostics::default();
    let loaded = check(file, &root, &mut out, &mut others);
    if let Some(l) = &loaded {
        more(&l.pipeline, &mut out);
    }
    let mut all = Diagnostics(out.found);
    all.extend(others);
    match loaded {
        Some(l) if all.is_empty() => Ok(l),
        _ => Err(all.sorted()),
    }
}

fn check(
    file: &Path,
    root: &Node,
    out: &mut Collector<'_>,
    others: &mut Diagnostics,
) -> Option<LoadedPipeline> {
    let before = out.found.len();
    static SHAPE: std::sync::OnceLock<Shape> = std::sync::OnceLock::new();
    let json = SHAPE.get_or_init(Shape::of::<Pipeline>).read_lenient(
        root,
        &mut Vec::new(),
        out,
        Options::default(),
    );
    // Go on to the semantic checks whenever what was read still makes a pipeline (see
    // `component::check`).
    let pipeline: Pipeline = match serde_json::from_value(json) {
        Ok(p) => p,
        Err(e) => {
            if out.found.len() == before {
                out.at(&[], format!("cannot read the pipeline: {e}"));
            }
            return None;
        }
    };
    check_fields(&pipeline, out);
    let components = load_components(
        file,
        root,
        &pipeline.components,
        &[key("components")],
        out,
        others,
    );
    let tests = load_components(
        file,
        root,
        &pipeline.tests.components,
        &[key("tests"), key("components")],
        out,
        others,
    );
    let ok = out.found.len() == before && others.is_empty();
    ok.then(|| LoadedPipeline {
        file: file.to_path_buf(),
        pipeline,
        components: components.into_iter().flatten().collect(),
        tests: tests.into_iter().flatten().collect(),
    })
}

fn report<T>(out: &mut Collector<'_>, path: &[Seg], result: Result<T, String>) {
    if let Err(message) = result {
        out.at(path, message);
    }
}

fn check_fields(p: &Pipeline, out: &mut Collector<'_>) {
    report(out, &[key("version")], p.version.parse::<SemVer>());
    match &p.parent {
        Parent::Ami(id) => report(out, &[key("parent"), key("ami")], shape::ami_id(id)),
        Parent::SsmParameter(name) => report(
            out,
            &[key("parent"), key("ssmParameter")],
            shape::ssm_parameter_name(name),
        ),
        Parent::Filter(f) => {
            for (i, owner) in f.owners.iter().enumerate() {
                if !matches!(owner.as_str(), "self" | "amazon" | "aws-marketplace") {
                    let r = AccountId::parse(owner).map_err(|_| format!("owner `{owner}` is not `self`, `amazon`, `aws-marketplace` or a 12-digit account id"));
                    report(
                        out,
                        &[key("parent"), key("filter"), key("owners"), Seg::Index(i)],
                        r,
                    );
                }
            }
            if f.name.trim().is_empty() {
                out.at(
                    &[key("parent"), key("filter"), key("name")],
                    "the name pattern is empty; use e.g. `al2023-ami-2023.*-x86_64`",
                );
            }
        }
        Parent::Local(name) => {
            if name.trim().is_empty() {
                out.at(
                    &[key("parent"), key("local")],
                    "name the embedded image (see `kiln image list`)",
                );
            }
        }
    }
    if !p.working_directory.starts_with('/') {
        out.at(
            &[key("workingDirectory")],
            format!("`{}` must be an absolute path", p.working_directory),
        );
    }
    if let Some(t) = &p.tests.instance_type {
        report(
            out,
            &[key("tests"), key("instanceType")],
            shape::instance_type(t),
        );
    }
    check_block_devices(p, out);
    check_infrastructure(p, out);
    check_distribution(p, out);
    check_secrets_reachable(p, out);
    if let Some(s) = &p.schedule {
        if let Some(cron) = &s.cron {
            report(out, &[key("schedule"), key("cron")], Cron::parse(cron));
        }
        if s.timezone.parse::<chrono_tz::Tz>().is_err() {
            let names = chrono_tz::TZ_VARIANTS.iter().map(|t| t.name());
            let hint = crate::diag::did_you_mean(&s.timezone, names)
                .map(|n| format!("; did you mean `{n}`?"))
                .unwrap_or_default();
            out.at(
                &[key("schedule"), key("timezone")],
                format!(
                    "`{}` is not an IANA time zone such as `Europe/Berlin`{hint}",
                    s.timezone
                ),
            );
        }
    }
    if let Some(l) = &p.lifecycle {
        if let (Some(dep), Some(del)) = (l.deprecate_after_days, l.delete_after_days) {
            if del < dep {
                out.at(&[key("lifecycle"), key("deleteAfterDays")], format!("images would be deleted ({del} days) before they are deprecated ({dep} days)"));
            }
        }
        if l.keep_latest.is_none()
            && l.deprecate_after_days.is_none()
            && l.delete_after_days.is_none()
        {
            out.at(
                &[key("lifecycle")],
                "set at least one of keepLatest, deprecateAfterDays, deleteAfterDays",
            );
        }
    }
}

fn check_block_devices(p: &Pipeline, out: &mut Collector<'_>) {
    let mut names = Vec::new();
    for (i, d) in p.block_devices.iter().enumerate() {
        let at = |f: &str| vec![key("blockDevices"), Seg::Index(i), key(f)];
        if names.contains(&d.device_name) {
            out.at(
                &at("deviceName"),
                format!("device `{}` is listed twice", d.device_name),
            );
        }
        names.push(d.device_name.clone());
        if !d.device_name.starts_with("/dev/") {
            out.at(
                &at("deviceName"),
                format!("`{}` is not a device name such as /dev/xvda", d.device_name),
            );
        }
        let vt = d.volume_type.unwrap_or(VolumeType::Gp3);
        if let Some(iops) = d.iops {
            let range = match vt {
                VolumeType::Gp3 => Some(3000..=80000),
                VolumeType::Io1 => Some(100..=64000),
                VolumeType::Io2 => Some(100..=256000),
                _ => None,
            };
            match range {
                None => out.at(
                    &at("iops"),
                    format!("iops can only be set for gp3, io1 and io2 volumes, not {vt:?}")
                        .to_lowercase(),
                ),
                Some(r) if !r.contains(&iops) => out.at(
                    &at("iops"),
                    format!(
                        "iops for {} volumes is {} to {}",
                        format!("{vt:?}").to_lowercase(),
                        r.start(),
                        r.end()
                    ),
                ),
                _ => {}
            }
        } else if matches!(vt, VolumeType::Io1 | VolumeType::Io2) {
            out.at(
                &[key("blockDevices"), Seg::Index(i)],
                "io1 and io2 volumes need `iops`",
            );
        }
        if let Some(t) = d.throughput {
            if vt != VolumeType::Gp3 {
                out.at(
                    &at("throughput"),
                    "throughput can only be set for gp3 volumes",
                );
            } else if !(125..=2000).contains(&t) {
                out.at(
                    &at("throughput"),
                    "throughput for gp3 volumes is 125 to 2000 MiB/s",
                );
            }
        }
        if let Some(k) = &d.kms_key_id {
            report(out, &at("kmsKeyId"), shape::kms_key(k));
            if !d.encrypted {
                out.at(&at("kmsKeyId"), "a KMS key needs `encrypted: true`");
            }
        }
    }
}

fn check_infrastructure(p: &Pipeline, out: &mut Collector<'_>) {
    let inf = &p.infrastructure;
    let at = |f: &str| vec![key("infrastructure"), key(f)];
    if let Some(r) = &inf.region {
        report(out, &at("region"), Region::parse(r));
    }
    for (i, t) in inf.instance_types.iter().enumerate() {
        report(
            out,
            &[key("infrastructure"), key("instanceTypes"), Seg::Index(i)],
            shape::instance_type(t),
        );
    }
    if let Some(s) = &inf.subnet_id {
        report(out, &at("subnetId"), shape::subnet_id(s));
    }
    for (i, sg) in inf.security_group_ids.iter().enumerate() {
        report(
            out,
            &[
                key("infrastructure"),
                key("securityGroupIds"),
                Seg::Index(i),
            ],
            shape::security_group_id(sg),
        );
    }
    if !inf.security_group_ids.is_empty() && inf.subnet_id.is_none() {
        out.at(
            &at("securityGroupIds"),
            "security groups belong to a VPC: set `subnetId` too",
        );
    }
    if let Some(ip) = &inf.instance_profile {
        report(out, &at("instanceProfile"), shape::instance_profile(ip));
    }
    if let Some(t) = &inf.sns_topic_arn {
        report(out, &at("snsTopicArn"), shape::topic_arn(t));
    }
    // `network` as a bare word has no `allow`; written as a map, its entries are under it.
    for (i, a) in inf.network.allow.iter().enumerate() {
        let at = [
            key("infrastructure"),
            key("network"),
            key("allow"),
            Seg::Index(i),
        ];
        report(out, &at, Allowed::parse(a));
    }
    if !inf.network.allow.is_empty() && inf.network.mode != Network::Private {
        out.at(
            &[key("infrastructure"), key("network"), key("allow")],
            format!(
                "`allow` opens destinations of a `private` network; `{}` has no default-deny to open",
                inf.network.mode.as_str()
            ),
        );
    }
    if let Limits::Bounded { memory, .. } = inf.limits {
        if memory < MIN_MEMORY {
            out.at(
                &[key("infrastructure"), key("limits"), key("memory")],
                format!(
                    "{memory} bytes is too little for an instance to start: at least {}MiB",
                    MIN_MEMORY >> 20
                ),
            );
        }
    }
    for k in inf.tags.keys() {
        if k.starts_with("kiln:") || k.starts_with("aws:") {
            out.at_key(
                &[key("infrastructure"), key("tags"), key(k)],
                format!("tag `{k}`: the `kiln:` and `aws:` prefixes are reserved"),
                Vec::new(),
            );
        }
    }
}

/// The pipeline's SSM parameters against what the deployed stack's roles may do with them: a
/// parent outside what the stack reads would fail every build at launch, an image id outside what
/// it publishes every distribution, and a SecureString read with the stack's builder profile
/// (which reads none) every customize or test.
fn check_stack_grants(p: &Pipeline, grants: &StackGrants, out: &mut Collector<'_>) {
    let (stack, prefix) = (&grants.stack, &grants.parameter_prefix);
    if let Parent::SsmParameter(name) = &p.parent {
        if !grants.reads_parent(name) {
            out.at(
                &[key("parent"), key("ssmParameter")],
                format!("stack `{stack}` reads parent parameters only under /aws/service/ and {prefix} (its ImageParameterPrefix): its functions may not read `{name}`; publish the parent under {prefix}, or deploy the stack with another ImageParameterPrefix"),
            );
        }
    }
    for (i, d) in p.distribution.iter().enumerate() {
        if let Some(name) = &d.ssm_parameter {
            if !grants.publishes(name) {
                out.at(
                    &[key("distribution"), Seg::Index(i), key("ssmParameter")],
                    format!("stack `{stack}` publishes image ids only under {prefix} (its ImageParameterPrefix): its distribute function may not write `{name}`"),
                );
            }
        }
    }
    if p.infrastructure.instance_profile.is_some() {
        return; // the pipeline's own profile: its role's grants are the pipeline author's
    }
    let lists = [
        ("components", &p.components),
        ("tests", &p.tests.components),
    ];
    for (list, refs) in lists {
        for (i, r) in refs.iter().enumerate() {
            for (name, value) in &r.parameters {
                if let Some(parameter) = component::secure_reference(value) {
                    let mut at = vec![key(list)];
                    if list == "tests" {
                        at.push(key("components"));
                    }
                    at.extend([Seg::Index(i), key("parameters"), key(name)]);
                    out.at(
                        &at,
                        format!("`{parameter}` is read on the instance with its instance profile's role, and stack `{stack}`'s builder profile may read no parameter: name an instance profile whose role may read it (infrastructure.instanceProfile)"),
                    );
                }
            }
        }
    }
}

/// `{{ ssm-secure:… }}` is read by the agent with the instance's AWS credentials, which embedded
/// instances do not have.
fn check_secrets_reachable(p: &Pipeline, out: &mut Collector<'_>) {
    if !matches!(p.parent, Parent::Local(_)) {
        return;
    }
    let lists = [
        ("components", &p.components),
        ("tests", &p.tests.components),
    ];
    for (list, refs) in lists {
        for (i, r) in refs.iter().enumerate() {
            for (name, value) in &r.parameters {
                if component::secure_reference(value).is_some() {
                    let mut at = vec![key(list)];
                    if list == "tests" {
                        at.push(key("components"));
                    }
                    at.extend([Seg::Index(i), key("parameters"), key(name)]);
                    out.at(
                        &at,
                        "an SSM SecureString is read with the instance's AWS credentials, which embedded instances (parent.local) do not have: pass the value another way, or build on AWS",
                    );
                }
            }
        }
    }
}

fn check_distribution(p: &Pipeline, out: &mut Collector<'_>) {
    let mut seen = Vec::new();
    let sample = NameContext {
        pipeline: &p.name,
        version: &p.version,
        build_number: 1,
        build_date: "20260101000000",
    };
    for (i, d) in p.distribution.iter().enumerate() {
        let at = |f: &str| vec![key("distribution"), Seg::Index(i), key(f)];
        report(out, &at("region"), Region::parse(&d.region));
        if seen.contains(&d.region) {
            out.at(
                &at("region"),
                format!("region `{}` is listed twice", d.region),
            );
        }
        seen.push(d.region.clone());
        match render_name(&d.ami_name, &sample) {
            Ok(name) => report(out, &at("amiName"), check_image_name(&name)),
            Err(e) => out.at(&at("amiName"), e),
        }
        if let Some(k) = &d.kms_key_id {
            report(out, &at("kmsKeyId"), shape::kms_key(k));
            let volumes = p.block_devices.iter().find_map(|b| b.kms_key_id.as_deref());
            if d.region == p.home_region() && volumes != Some(k.as_str()) {
                out.at(
                    &at("kmsKeyId"),
                    format!(
                        "in the build region the image keeps its volumes' key ({}): set blockDevices[].kmsKeyId to `{k}` instead",
                        volumes.unwrap_or("none set")
                    ),
                );
            }
        }
        if let Some(lp) = &d.launch_permission {
            let base = [key("distribution"), Seg::Index(i), key("launchPermission")];
            for (j, a) in lp.accounts.iter().enumerate() {
                report(
                    out,
                    &[&base[..], &[key("accounts"), Seg::Index(j)]].concat(),
                    AccountId::parse(a),
                );
            }
            for (j, a) in lp.organization_arns.iter().enumerate() {
                report(
                    out,
                    &[&base[..], &[key("organizationArns"), Seg::Index(j)]].concat(),
                    shape::organization_arn(a),
                );
            }
            for (j, a) in lp.organizational_unit_arns.iter().enumerate() {
                report(
                    out,
                    &[&base[..], &[key("organizationalUnitArns"), Seg::Index(j)]].concat(),
                    shape::organizational_unit_arn(a),
                );
            }
            if lp.public && d.kms_key_id.is_some() {
                out.at(
                    &[&base[..], &[key("public")]].concat(),
                    "an image encrypted with a KMS key cannot be made public",
                );
            }
            // Sharing an encrypted image: the recipients must be able to use its key, and no
            // other account can use an AWS managed key (aws/ebs).
            let shares = !lp.accounts.is_empty()
                || !lp.organization_arns.is_empty()
                || !lp.organizational_unit_arns.is_empty();
            if shares && p.block_devices.iter().any(|b| b.encrypted) {
                let home = d.region == p.home_region();
                let key = if home {
                    p.block_devices.iter().find_map(|b| b.kms_key_id.as_deref())
                } else {
                    d.kms_key_id.as_deref()
                };
                let managed =
                    key.is_none_or(|k| k == "alias/aws/ebs" || k.ends_with(":alias/aws/ebs"));
                if managed {
                    let fix = if home {
                        "set blockDevices[].kmsKeyId (the build region's image keeps its volumes' key)"
                    } else {
                        "set this distribution's kmsKeyId (the copy is encrypted with it)"
                    };
                    out.at(
                        &base,
                        format!(
                            "an image encrypted with the AWS managed key aws/ebs cannot be shared with other accounts: {fix} to a customer managed key in {} whose key policy lets the recipients use it (kms:Decrypt, kms:DescribeKey, kms:CreateGrant, kms:ReEncrypt*, kms:GenerateDataKeyWithoutPlaintext)",
                            d.region
                        ),
                    );
                }
            }
        }
        if let Some(s) = &d.ssm_parameter {
            report(out, &at("ssmParameter"), shape::ssm_parameter_name(s));
            if s.starts_with("/aws/") {
                out.at(
                    &at("ssmParameter"),
                    "parameters under /aws/ belong to AWS; choose a name of your own",
                );
            }
        }
        for (j, lt) in d.launch_templates.iter().enumerate() {
            report(
                out,
                &[
                    key("distribution"),
                    Seg::Index(i),
                    key("launchTemplates"),
                    Seg::Index(j),
                    key("id"),
                ],
                shape::launch_template_id(&lt.id),
            );
        }
        for k in d.tags.keys() {
            if k.starts_with("kiln:") || k.starts_with("aws:") {
                out.at_key(
                    &[key("distribution"), Seg::Index(i), key("tags"), key(k)],
                    format!("tag `{k}`: the `kiln:` and `aws:` prefixes are reserved"),
                    Vec::new(),
                );
            }
        }
    }
}

/// Loads each component of a list; `None` for one that failed (its problems are reported).
fn load_components(
    file: &Path,
    root: &Node,
    refs: &[ComponentRef],
    at: &[Seg],
    out: &mut Collector<'_>,
    others: &mut Diagnostics,
) -> Vec<Option<LoadedComponent>> {
    refs.iter()
        .enumerate()
        .map(|(i, r)| {
            let here: Vec<Seg> = [at, &[Seg::Index(i)]].concat();
            let loaded = match (&r.path, &r.inline) {
                (Some(path), None) => {
                    let full = component_path(file, path);
                    if !full.is_file() {
                        out.at(&[&here[..], &[key("path")]].concat(), format!("component file `{}` does not exist", full.display()));
                        return None;
                    }
                    match component::load_file(&full) {
                        Ok(doc) => Some((Origin::File(full), doc)),
                        Err(problems) => {
                            out.at(&[&here[..], &[key("path")]].concat(), format!("component `{path}` is invalid ({} problem{} listed for that file)", problems.0.len(), if problems.0.len() == 1 { "" } else { "s" }));
                            others.extend(problems);
                            None
                        }
                    }
                }
                (None, Some(_)) => {
                    let mut p: Vec<Seg> = [&here[..], &[key("inline")]].concat();
                    let node = crate::diag::locate_node(root, &p)?;
                    component::check(node, &mut p, out).map(|doc| (Origin::Inline { pipeline: file.to_path_buf(), index: i }, doc))
                }
                _ => {
                    out.at(&here, "a component has exactly one of `path` and `inline`");
                    None
                }
            }?;
            let (origin, doc) = loaded;
            check_parameters(&doc.document, &r.parameters, &here, out);
            Some(LoadedComponent { origin, document: doc, parameters: r.parameters.clone() })
        })
        .collect()
}

/// Parameters given must exist in the document; parameters without a default must be given.
fn check_parameters(
    doc: &component::Document,
    given: &std::collections::BTreeMap<String, String>,
    at: &[Seg],
    out: &mut Collector<'_>,
) {
    let declared: Vec<&str> = doc.parameter_names().collect();
    for (name, value) in given {
        if let Err(e) = component::check_secure_reference(value) {
            out.at(&[at, &[key("parameters"), key(name)]].concat(), e);
            continue;
        }
        if component::secure_reference(value).is_some() {
            // Resolved on the instance; allowedValues cannot be checked here.
            continue;
        }
        if let Some(allowed) = doc.parameter(name).and_then(|s| s.allowed_values.as_ref()) {
            if !allowed.contains(value) {
                out.at_with_allowed(
                    &[at, &[key("parameters"), key(name)]].concat(),
                    format!("`{value}` is not an allowed value of parameter `{name}`"),
                    allowed.clone(),
                );
            }
        }
        if !declared.contains(&name.as_str()) {
            let hint = crate::diag::did_you_mean(name, declared.iter().copied())
                .map(|s| format!("; did you mean `{s}`?"))
                .unwrap_or_default();
            let message = if declared.is_empty() {
                format!("parameter `{name}`: this component declares no parameters")
            } else {
                format!("parameter `{name}` is not declared by the component{hint}")
            };
            out.at_key(
                &[at, &[key("parameters"), key(name)]].concat(),
                message,
                declared.iter().map(|s| s.to_string()).collect(),
            );
        }
    }
    for name in &declared {
        let spec = doc.parameter(name);
        if spec.is_some_and(|s| s.default.is_none()) && !given.contains_key(*name) {
            out.at(
                at,
                format!("the component needs parameter `{name}` (it has no default)"),
            );
        }
    }
}
