//! The tools the tests run are the ones the lock files pin (tests/tools/): what `make setup`
//! installed is compared, package by package, with `python.txt`, `sam.txt`, `checkov.txt` and
//! `package-lock.json`. A tool upgraded by hand, or a lock changed without `make setup`, fails.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::Command;

use crate::support::repo;

fn venv() -> PathBuf {
    std::env::var_os("KILN_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo().join(".venv"))
}

/// A PyPI name as pip compares names (PEP 503).
fn normalized(name: &str) -> String {
    name.to_ascii_lowercase().replace(['_', '.'], "-")
}

/// `name==version` lines of a requirements text (a lock's hash lines and comments skipped).
fn pins(text: &str) -> BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter_map(|l| l.split_once("=="))
        .map(|(n, v)| (normalized(n), v.to_string()))
        .collect()
}

#[test]
fn every_python_environment_holds_exactly_what_its_lock_pins() {
    for env in ["python", "sam", "checkov"] {
        // GIVEN the environment `make setup` made from tests/tools/<env>.txt
        let lock = std::fs::read_to_string(repo().join(format!("tests/tools/{env}.txt")))
            .expect("the lock");
        let locked = pins(&lock);
        assert!(
            locked.len() > 5,
            "{env}: the lock pins its dependencies too"
        );
        // WHEN pip lists what is installed there
        let pip = venv().join(env).join("bin/pip");
        assert!(
            pip.is_file(),
            "{} not found: run `make setup`",
            pip.display()
        );
        let out = Command::new(&pip)
            .args(["freeze", "--all", "--disable-pip-version-check"])
            .output()
            .expect("pip freeze");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let mut installed = pins(&String::from_utf8_lossy(&out.stdout));
        // (the installer itself comes with the environment, unless the lock pins it)
        for tool in ["pip", "setuptools", "wheel"] {
            if !locked.contains_key(tool) {
                installed.remove(tool);
            }
        }
        // THEN it is exactly the lock: no package more, less or at another version
        assert_eq!(
            installed, locked,
            "{env}: installed (left) against the lock (right)"
        );
    }
}

#[test]
fn the_npm_tools_are_the_ones_package_lock_pins() {
    // GIVEN the lock `npm ci` installed from
    let lock: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo().join("tests/tools/package-lock.json")).expect("lock"),
    )
    .expect("JSON");
    let packages = lock["packages"].as_object().expect("packages");
    let node = venv().join("node");
    let mut checked = 0;
    for (path, entry) in packages.iter().filter(|(p, _)| !p.is_empty()) {
        // WHEN each locked package's manifest is read where npm put it
        let manifest = node.join(path).join("package.json");
        let text = std::fs::read_to_string(&manifest)
            .unwrap_or_else(|e| panic!("{}: {e} (run `make setup`)", manifest.display()));
        let installed: serde_json::Value = serde_json::from_str(&text).expect("JSON");
        // THEN its version is the locked one
        assert_eq!(installed["version"], entry["version"], "{path}");
        checked += 1;
    }
    // AND nothing else sits at the top level of node_modules
    let top: Vec<String> = std::fs::read_dir(node.join("node_modules"))
        .expect("node_modules")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| !n.starts_with('.'))
        .flat_map(|n| {
            if n.starts_with('@') {
                std::fs::read_dir(node.join("node_modules").join(&n))
                    .expect("scope")
                    .filter_map(|e| e.ok())
                    .map(|e| format!("{n}/{}", e.file_name().to_string_lossy()))
                    .collect()
            } else {
                vec![n]
            }
        })
        .collect();
    for name in &top {
        assert!(
            packages.contains_key(&format!("node_modules/{name}")),
            "node_modules/{name} is installed but not locked"
        );
    }
    assert!(checked >= 2, "asl-validator and iam-simulate at least");
}
