//! The profiles in `tuning/` can be installed as they are: every key of
//! `tuning/sysctl.d/*.conf` exists on this kernel and has its reason in a comment directly
//! above it, and the limits files set what `parleyd` needs, consistently with the sysctl
//! profile. Nothing here writes a kernel setting; the keys are only looked up under
//! /proc/sys.

use std::collections::BTreeMap;
use std::fs;
use std::path::{Path, PathBuf};

fn tuning_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tuning")
}

/// One `key = value` line of a sysctl.d file.
#[derive(Debug)]
struct Setting {
    line: usize,
    key: String,
    value: String,
    /// Written `-key = value`: failures to set it are ignored (sysctl.d(5)), for keys that
    /// exist only where a module is loaded.
    optional: bool,
}

fn is_comment(line: &str) -> bool {
    line.starts_with('#') || line.starts_with(';')
}

/// A comment that says something (not a bare `#`).
fn is_reason(line: &str) -> bool {
    is_comment(line) && line[1..].trim().chars().any(char::is_alphanumeric)
}

/// Parses a sysctl.d file. Problems (a line that is neither blank, a comment nor
/// `key = value`; a setting without a comment directly above it) are returned as text.
fn parse_sysctl(text: &str) -> (Vec<Setting>, Vec<String>) {
    let mut settings = Vec::new();
    let mut problems = Vec::new();
    let mut previous = "";
    for (index, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let number = index + 1;
        if !line.is_empty() && !is_comment(line) {
            match line.split_once('=') {
                Some((key, value)) if !key.trim().is_empty() && !value.trim().is_empty() => {
                    let key = key.trim();
                    let (key, optional) = match key.strip_prefix('-') {
                        Some(rest) => (rest.trim(), true),
                        None => (key, false),
                    };
                    if !is_reason(previous) {
                        problems.push(format!(
                            "line {number}: `{key}` has no comment directly above it (its reason)"
                        ));
                    }
                    settings.push(Setting {
                        line: number,
                        key: key.to_string(),
                        value: value.split_whitespace().collect::<Vec<_>>().join(" "),
                        optional,
                    });
                }
                _ => problems.push(format!("line {number}: not `key = value`: {line}")),
            }
        }
        previous = line;
    }
    (settings, problems)
}

/// The file under `proc_sys` that holds `key` (dots are separators unless the key is
/// already written with slashes, as sysctl.d also allows).
fn proc_path(proc_sys: &Path, key: &str) -> PathBuf {
    if key.contains('/') {
        proc_sys.join(key.trim_start_matches('/'))
    } else {
        proc_sys.join(key.replace('.', "/"))
    }
}

/// Every problem of one sysctl.d file against a /proc/sys tree. Optional (`-`) keys may be
/// absent; their names are returned separately so the caller can report them.
fn check_sysctl(text: &str, proc_sys: &Path) -> (Vec<Setting>, Vec<String>, Vec<String>) {
    let (settings, mut problems) = parse_sysctl(text);
    let mut absent_optional = Vec::new();
    for setting in &settings {
        if proc_path(proc_sys, &setting.key).is_file() {
            continue;
        }
        if setting.optional {
            absent_optional.push(setting.key.clone());
        } else {
            problems.push(format!(
                "line {}: `{}` does not exist on this kernel ({} is missing)",
                setting.line,
                setting.key,
                proc_path(proc_sys, &setting.key).display()
            ));
        }
    }
    (settings, problems, absent_optional)
}

fn sysctl_files() -> Vec<PathBuf> {
    let dir = tuning_dir().join("sysctl.d");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "conf"))
        .collect();
    files.sort();
    files
}

/// Every setting of every profile, by key.
fn all_settings() -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    for file in sysctl_files() {
        let (settings, _) = parse_sysctl(&fs::read_to_string(&file).unwrap());
        for setting in settings {
            all.insert(setting.key, setting.value);
        }
    }
    all
}

#[test]
fn every_sysctl_key_exists_here_and_has_its_reason() {
    let files = sysctl_files();
    let names: Vec<String> = files
        .iter()
        .map(|f| f.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    for expected in ["90-parley.conf", "91-parley-loadgen.conf"] {
        assert!(
            names.iter().any(|n| n == expected),
            "tuning/sysctl.d/{expected} is missing (found {names:?})"
        );
    }
    let proc_sys = Path::new("/proc/sys");
    assert!(
        proc_sys.join("kernel/ostype").is_file(),
        "no /proc/sys here"
    );
    let mut problems = Vec::new();
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut count = 0;
    for file in &files {
        let name = file.file_name().unwrap().to_string_lossy().into_owned();
        let text = fs::read_to_string(file).unwrap();
        let (settings, file_problems, absent) = check_sysctl(&text, proc_sys);
        assert!(!settings.is_empty(), "{name} sets nothing");
        count += settings.len();
        problems.extend(file_problems.into_iter().map(|p| format!("{name}: {p}")));
        for key in absent {
            eprintln!("note: {name}: optional key {key} is not present on this kernel");
        }
        // Both files are installed together on a generator machine: a key set twice would
        // make the outcome depend on the order the files are applied in.
        for setting in settings {
            if let Some(other) = seen.insert(setting.key.clone(), name.clone()) {
                problems.push(format!("{name}: `{}` is also set in {other}", setting.key));
            }
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
    eprintln!("{count} settings in {} files checked", files.len());
}

/// `[Section]` -> key -> value of a systemd unit file (comments and blank lines skipped;
/// a later assignment wins, as in systemd).
fn parse_unit(text: &str) -> BTreeMap<String, BTreeMap<String, String>> {
    let mut sections: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut current = String::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || is_comment(line) {
            continue;
        }
        if let Some(name) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            current = name.to_string();
            continue;
        }
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not key=value: {line}"));
        sections
            .entry(current.clone())
            .or_default()
            .insert(key.trim().to_string(), value.trim().to_string());
    }
    sections
}

fn nr_open() -> u64 {
    all_settings()
        .get("fs.nr_open")
        .expect("90-parley.conf sets fs.nr_open")
        .parse()
        .expect("fs.nr_open is a number")
}

#[test]
fn the_drop_in_sets_the_descriptor_and_memlock_limits() {
    let path = tuning_dir().join("limits/parleyd.service.d/limits.conf");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let unit = parse_unit(&text);
    let service = unit
        .get("Service")
        .expect("the drop-in has a [Service] section");
    let nofile = service
        .get("LimitNOFILE")
        .expect("the drop-in sets LimitNOFILE");
    let nofile: u64 = nofile
        .parse()
        .unwrap_or_else(|_| panic!("LimitNOFILE={nofile}: expected a number"));
    assert!(
        nofile > 1_048_576,
        "LimitNOFILE={nofile} is not above the unit's own 1048576"
    );
    assert!(
        nofile <= nr_open(),
        "LimitNOFILE={nofile} exceeds fs.nr_open={} in 90-parley.conf: it would not be granted",
        nr_open()
    );
    let memlock = service
        .get("LimitMEMLOCK")
        .expect("the drop-in sets LimitMEMLOCK");
    assert!(
        memlock == "infinity"
            || memlock
                .trim_end_matches(['K', 'M', 'G'])
                .parse::<u64>()
                .is_ok(),
        "LimitMEMLOCK={memlock}: expected infinity or a size"
    );
    // Every assignment carries its reason, as in the sysctl profiles.
    let mut previous = "";
    for line in text.lines().map(str::trim) {
        if line.starts_with("Limit") {
            assert!(is_reason(previous), "no comment directly above {line}");
        }
        previous = line;
    }
}

#[test]
fn the_limits_d_file_stays_within_fs_nr_open() {
    let path = tuning_dir().join("limits/limits.d/90-parley.conf");
    let text = fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut items = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.is_empty() || is_comment(line) {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(fields.len(), 4, "not `domain type item value`: {line}");
        assert!(
            ["soft", "hard", "-"].contains(&fields[1]),
            "bad type: {line}"
        );
        items.push((fields[2].to_string(), fields[3].to_string()));
    }
    let nofile: Vec<&String> = items
        .iter()
        .filter(|(item, _)| item == "nofile")
        .map(|(_, value)| value)
        .collect();
    assert!(!nofile.is_empty(), "limits.d sets no nofile");
    for value in nofile {
        // "unlimited" cannot be set for nofile: the login would be refused.
        let value: u64 = value
            .parse()
            .unwrap_or_else(|_| panic!("nofile {value}: expected a number"));
        assert!(value <= nr_open(), "nofile {value} exceeds fs.nr_open");
    }
    assert!(
        items.iter().any(|(item, _)| item == "memlock"),
        "limits.d sets no memlock"
    );
}

/// The checker itself, on a fake /proc/sys: it must catch what it is there to catch.
#[test]
fn the_checker_catches_missing_reasons_and_unknown_keys() {
    let root = tempfile::tempdir().unwrap();
    for key in ["net/core/somaxconn", "fs/nr_open"] {
        let path = root.path().join(key);
        fs::create_dir_all(path.parent().unwrap()).unwrap();
        fs::write(path, "0\n").unwrap();
    }
    let good = "# why\nnet.core.somaxconn = 1\n\n; why too\nfs/nr_open=2\n# module\n-net.netfilter.nf_conntrack_max = 3\n";
    let (settings, problems, absent) = check_sysctl(good, root.path());
    assert_eq!(problems, Vec::<String>::new());
    assert_eq!(settings.len(), 3);
    assert_eq!(absent, vec!["net.netfilter.nf_conntrack_max".to_string()]);

    let bad = "# reason\nnet.core.somaxconn = 1\nfs.nr_open = 2\n#\nnet.core.no_such_key = 3\n\n# blank line below\n\nfs.nr_open = 4\njunk\n";
    let (_, problems, _) = check_sysctl(bad, root.path());
    let text = problems.join("\n");
    assert!(
        text.contains("line 3: `fs.nr_open` has no comment"),
        "{text}"
    );
    assert!(
        text.contains("line 5: `net.core.no_such_key` has no comment"),
        "{text}"
    );
    assert!(
        text.contains("line 5: `net.core.no_such_key` does not exist"),
        "{text}"
    );
    assert!(
        text.contains("line 9: `fs.nr_open` has no comment"),
        "{text}"
    );
    assert!(text.contains("line 10: not `key = value`"), "{text}");
    assert_eq!(problems.len(), 5, "{text}");
}
