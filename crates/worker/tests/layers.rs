//! The worker's modules import only what the table in `src/lib.rs` allows them (a DAG: the
//! flow broker → delivery → decide → storage, with startup alone wiring everything).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The table between the `layers` markers of `lib.rs`: module → the modules it may import.
fn allowed(lib: &str) -> BTreeMap<String, BTreeSet<String>> {
    let start = lib.find("<!-- layers -->").expect("the layers table in lib.rs");
    let end = lib.find("<!-- /layers -->").expect("the end of the layers table");
    let mut table = BTreeMap::new();
    for line in lib[start..end].lines().map(|l| l.trim_start_matches("//!").trim()) {
        let cells: Vec<&str> = line.trim_matches('|').split('|').map(str::trim).collect();
        let [module, imports] = cells[..] else { continue };
        let Some(module) = module.strip_prefix('`').and_then(|m| m.strip_suffix('`')) else { continue };
        let imports =
            imports.split(',').map(str::trim).filter(|s| !s.is_empty()).map(str::to_owned).collect();
        table.insert(module.to_owned(), imports);
    }
    table
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The `crate::<module>` paths of a source file, test modules left out (tests may import
/// freely): `crate::a::b`, and `use crate::{a, b::c}`.
fn imports(text: &str) -> BTreeSet<String> {
    let text = text.find("#[cfg(test)]\nmod tests").map_or(text, |cut| &text[..cut]);
    let mut found = BTreeSet::new();
    let ident = |s: &str| {
        s.chars()
            .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '_')
            .collect::<String>()
    };
    for (i, _) in text.match_indices("crate::") {
        if text[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
            continue;
        }
        let rest = &text[i + "crate::".len()..];
        if let Some(group) = rest.strip_prefix('{') {
            let group = &group[..group.find('}').unwrap_or(group.len())];
            found.extend(group.split(',').map(|p| ident(p.trim())).filter(|m| !m.is_empty()));
        } else {
            found.insert(ident(rest));
        }
    }
    found
}

#[test]
fn every_module_imports_only_what_the_layers_table_allows() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let table = allowed(&std::fs::read_to_string(src.join("lib.rs")).unwrap());
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut wrong = Vec::new();
    let mut modules = BTreeSet::new();
    for file in files {
        let rel = file.strip_prefix(&src).unwrap();
        let top = rel.components().next().unwrap().as_os_str().to_string_lossy();
        let module = top.trim_end_matches(".rs").to_owned();
        if module == "lib" || module == "main" || rel.file_name().is_some_and(|f| f == "tests.rs") {
            continue;
        }
        modules.insert(module.clone());
        let Some(may) = table.get(&module) else {
            wrong.push(format!("{} is not in the layers table of lib.rs", rel.display()));
            continue;
        };
        for used in imports(&std::fs::read_to_string(&file).unwrap()) {
            if used != module && table.contains_key(&used) && !may.contains(&used) {
                wrong.push(format!("{} imports crate::{used}, which {module} may not", rel.display()));
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    let listed: BTreeSet<String> = table.keys().cloned().collect();
    assert_eq!(listed, modules, "the layers table lists exactly the modules");
}

/// The table itself is a DAG: following "may import" never comes back to where it started.
#[test]
fn the_layers_table_has_no_cycle() {
    let lib = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("src/lib.rs")).unwrap();
    let table = allowed(&lib);
    fn reaches(
        table: &BTreeMap<String, BTreeSet<String>>,
        from: &str,
        to: &str,
        seen: &mut BTreeSet<String>,
    ) -> bool {
        table
            .get(from)
            .into_iter()
            .flatten()
            .any(|m| m == to || (seen.insert(m.clone()) && reaches(table, m, to, seen)))
    }
    for module in table.keys() {
        assert!(!reaches(&table, module, module, &mut BTreeSet::new()), "{module} reaches itself");
    }
}

/// The check reads what it should: an import outside the table is found.
#[test]
fn imports_are_read_from_paths_and_groups_but_not_tests() {
    let text = "use crate::decide::Verdict;\nuse crate::{admin, security::Sessions};\nfn f() { crate::sweep::run(); }\n#[cfg(test)]\nmod tests { use crate::startup; }";
    let got: Vec<String> = imports(text).into_iter().collect();
    assert_eq!(got, ["admin", "decide", "security", "sweep"]);
}
