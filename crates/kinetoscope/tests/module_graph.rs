//! The library's modules import each other without a cycle (ARCHITECTURE.md draws the layers): each module
//! can be read, tested and replaced knowing only the ones below it, and `error` is at the bottom.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

/// Module → the crate modules its code names (`crate::name`), comments left out. A folder is one module.
fn imports() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut graph = BTreeMap::new();
    for entry in std::fs::read_dir(&src).unwrap() {
        let path = entry.unwrap().path();
        let (module, files) = if path.is_dir() {
            let files = std::fs::read_dir(&path).unwrap().map(|e| e.unwrap().path()).collect::<Vec<_>>();
            (path.file_name().unwrap().to_string_lossy().into_owned(), files)
        } else {
            (path.file_stem().unwrap().to_string_lossy().into_owned(), vec![path.clone()])
        };
        if module == "lib" {
            continue;
        }
        let mut names = BTreeSet::new();
        for file in files {
            for line in std::fs::read_to_string(&file).unwrap().lines() {
                let code = line.split("//").next().unwrap();
                for (at, _) in code.match_indices("crate::") {
                    let rest = &code[at + "crate::".len()..];
                    let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
                    if !name.is_empty() && name != module {
                        names.insert(name);
                    }
                }
            }
        }
        graph.insert(module, names);
    }
    graph
}

#[test]
fn the_modules_form_no_cycle_and_error_imports_nothing() {
    let graph = imports();
    assert!(graph["error"].is_empty(), "error.rs must import nothing of the crate: {:?}", graph["error"]);
    // Peel off modules whose imports are all peeled; what is left is on a cycle.
    let mut placed: Vec<String> = Vec::new();
    let mut left = graph.clone();
    while !left.is_empty() {
        let ready: Vec<String> = left
            .iter()
            .filter(|(_, imports)| imports.iter().all(|i| placed.contains(i) || !graph.contains_key(i)))
            .map(|(m, _)| m.clone())
            .collect();
        assert!(!ready.is_empty(), "these modules import each other in a cycle: {left:?}");
        for module in ready {
            left.remove(&module);
            placed.push(module);
        }
    }
    println!("from the bottom: {placed:?}");
}
