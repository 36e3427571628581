//! The documentation's relative links resolve: every `[text](target)` in README.md and
//! docs/*.md that is not a URL names a file or directory that exists, and its `#anchor`, if
//! any, names a heading of the Markdown file it points to (GitHub's anchor rules). Code fences
//! are checked too: a line that starts with three backticks inside a code block but carries
//! text after them does not close the block, and silently swallows what follows (headings
//! included), so it is reported.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn doc_files() -> Vec<PathBuf> {
    let root = repo();
    let mut files = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .expect("docs/ exists")
        .map(|e| e.expect("readable docs/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    files.extend(docs);
    files
}

/// GitHub's anchor for a heading: inline markup and punctuation dropped (letters, digits,
/// `_`, `-` and spaces kept), lower-cased, spaces to hyphens.
fn anchor_of(heading: &str) -> String {
    // `[text](url)` shows as `text`.
    let mut visible = String::new();
    let mut rest = heading;
    while let Some(open) = rest.find('[') {
        match rest[open..].find("](").map(|i| open + i) {
            Some(mid) => match rest[mid..].find(')').map(|i| mid + i) {
                Some(close) => {
                    visible.push_str(&rest[..open]);
                    visible.push_str(&rest[open + 1..mid]);
                    rest = &rest[close + 1..];
                }
                None => break,
            },
            None => break,
        }
    }
    visible.push_str(rest);
    visible
        .trim()
        .to_lowercase()
        .chars()
        .filter(|c| c.is_alphanumeric() || *c == '_' || *c == '-' || *c == ' ')
        .map(|c| if c == ' ' { '-' } else { c })
        .collect()
}

/// Lines outside code fences, with their 1-based numbers; fence lines that cannot close
/// their block are returned as problems.
fn prose_lines(text: &str, file: &str, problems: &mut Vec<String>) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    let mut fence: Option<usize> = None;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim_start();
        match fence {
            None if t.starts_with("```") => fence = Some(i + 1),
            None => out.push((i + 1, line.to_string())),
            Some(_) if t.trim_end() == "```" => fence = None,
            Some(open) if t.starts_with("```") => problems.push(format!(
                "{file}:{}: text after the backticks: this line does not close the code block \
                 opened at line {open}",
                i + 1
            )),
            Some(_) => {}
        }
    }
    if let Some(open) = fence {
        problems.push(format!(
            "{file}:{open}: code block never closed (it swallows the rest of the file)"
        ));
    }
    out
}

fn anchors(path: &Path) -> HashSet<String> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut seen = HashSet::new();
    let mut ignored = Vec::new();
    for (_, line) in prose_lines(&text, "", &mut ignored) {
        let t = line.trim_start();
        let level = t.chars().take_while(|c| *c == '#').count();
        if (1..=6).contains(&level) && t[level..].starts_with(' ') {
            let base = anchor_of(&t[level..]);
            let mut a = base.clone();
            let mut n = 0;
            while seen.contains(&a) {
                n += 1;
                a = format!("{base}-{n}");
            }
            seen.insert(a);
        }
    }
    seen
}

/// `(line, target)` of every inline link in prose, inline code spans skipped.
fn links(lines: &[(usize, String)]) -> Vec<(usize, String)> {
    let mut out = Vec::new();
    for (n, line) in lines {
        // Drop inline code spans: a `[x](y)` inside backticks is not a link.
        let mut plain = String::new();
        for (k, part) in line.split('`').enumerate() {
            if k % 2 == 0 {
                plain.push_str(part);
            }
        }
        let mut rest = plain.as_str();
        while let Some(i) = rest.find("](") {
            let after = &rest[i + 2..];
            match after.find(')') {
                Some(j) => {
                    let target = after[..j].split_whitespace().next().unwrap_or("");
                    out.push((*n, target.to_string()));
                    rest = &after[j + 1..];
                }
                None => break,
            }
        }
    }
    out
}

fn problems_in(file: &Path) -> Vec<String> {
    let root = repo();
    let name = file
        .strip_prefix(&root)
        .unwrap_or(file)
        .display()
        .to_string();
    let text = std::fs::read_to_string(file).expect("readable doc");
    let mut problems = Vec::new();
    let lines = prose_lines(&text, &name, &mut problems);
    for (n, target) in links(&lines) {
        if target.contains("://") || target.starts_with("mailto:") || target.is_empty() {
            continue;
        }
        let (path_part, anchor) = match target.split_once('#') {
            Some((p, a)) => (p, Some(a)),
            None => (target.as_str(), None),
        };
        let dest = if path_part.is_empty() {
            file.to_path_buf()
        } else {
            file.parent().expect("a file has a parent").join(path_part)
        };
        if !dest.exists() {
            problems.push(format!("{name}:{n}: link to {target}: no such file"));
            continue;
        }
        if let Some(a) = anchor {
            if dest.extension().is_some_and(|e| e == "md") && !anchors(&dest).contains(a) {
                problems.push(format!(
                    "{name}:{n}: link to {target}: no heading with anchor #{a}"
                ));
            }
        }
    }
    problems
}

#[test]
fn every_relative_link_in_the_docs_resolves() {
    let problems: Vec<String> = doc_files().iter().flat_map(|f| problems_in(f)).collect();
    assert!(
        problems.is_empty(),
        "broken documentation:\n{}",
        problems.join("\n")
    );
}

#[test]
fn the_checker_sees_a_broken_link_a_missing_anchor_and_an_unclosed_fence() {
    let dir = std::env::temp_dir().join(format!("ckpt-doc-links-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("b.md"), "# Real `heading`: yes!\n").unwrap();
    let a = dir.join("a.md");
    std::fs::write(
        &a,
        "see [b](b.md#real-heading-yes), [gone](nope.md), [bad](b.md#nope), \
         `[code](not-a-link.md)`\n```sh\necho\n``` trailing text\n# Hidden\n",
    )
    .unwrap();
    let p = problems_in(&a);
    std::fs::remove_dir_all(&dir).ok();
    assert_eq!(p.len(), 4, "{p:#?}");
    assert!(p[0].contains("text after the backticks"), "{}", p[0]);
    assert!(p[1].contains("never closed"), "{}", p[1]);
    assert!(p[2].contains("nope.md: no such file"), "{}", p[2]);
    assert!(p[3].contains("no heading with anchor #nope"), "{}", p[3]);
}

#[test]
fn anchors_follow_githubs_rules() {
    assert_eq!(
        anchor_of(" `ckptstore crashtest`: does the guarantee hold on *your* file system?"),
        "ckptstore-crashtest-does-the-guarantee-hold-on-your-file-system"
    );
    assert_eq!(
        anchor_of(" Multi-process checkpoints (torch.distributed.checkpoint ranks)"),
        "multi-process-checkpoints-torchdistributedcheckpoint-ranks"
    );
    assert_eq!(anchor_of(" See [the format](FORMAT.md)"), "see-the-format");
}
