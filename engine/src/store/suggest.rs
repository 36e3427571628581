//! "Did you mean": the close matches a missing tensor or blob name is reported with.

use crate::error::Error;

/// Levenshtein distance over chars, with one row of memory.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diag = row[0];
        row[0] = i + 1;
        for (j, &cb) in b.iter().enumerate() {
            let next = (diag + usize::from(ca != cb))
                .min(row[j] + 1)
                .min(row[j + 1] + 1);
            diag = row[j + 1];
            row[j + 1] = next;
        }
    }
    row[b.len()]
}

fn common_prefix(a: &str, b: &str) -> usize {
    a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count()
}

/// Up to three of `candidates` close to `name`: within an edit distance of a third of the
/// longer name (at least 2), or one name a suffix of the other (a missing or extra scope such
/// as `network.`). Ranked by distance, then by longer common prefix, then by name.
pub(crate) fn close_matches<'c>(
    name: &str,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Vec<&'c str> {
    let len = name.chars().count();
    let mut ranked: Vec<(usize, std::cmp::Reverse<usize>, &str)> = candidates
        .into_iter()
        .filter(|c| *c != name)
        .filter_map(|c| {
            let clen = c.chars().count();
            let limit = (len.max(clen) / 3).max(2);
            let affix = !name.is_empty() && (c.ends_with(name) || name.ends_with(c));
            // Cheap bound first: the distance is at least the length difference.
            if !affix && len.abs_diff(clen) > limit {
                return None;
            }
            let d = edit_distance(name, c);
            (affix || d <= limit).then(|| (d, std::cmp::Reverse(common_prefix(name, c)), c))
        })
        .collect();
    ranked.sort();
    ranked.into_iter().take(3).map(|(_, _, c)| c).collect()
}

/// `NotFound` for a missing tensor or blob, naming close matches.
pub(crate) fn not_found<'c>(
    kind: &str,
    name: &str,
    checkpoint: u64,
    candidates: impl IntoIterator<Item = &'c str>,
) -> Error {
    let close = close_matches(name, candidates);
    let hint = if close.is_empty() {
        String::new()
    } else {
        format!("; did you mean {close:?}?")
    };
    Error::NotFound(format!("{kind} {name:?} in checkpoint {checkpoint}{hint}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance() {
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("layer.0.w", "layer.0.w"), 0);
        assert_eq!(edit_distance("ä", "a"), 1);
    }

    #[test]
    fn ranking() {
        let names = [
            "encoder.layer.0.weight",
            "encoder.layer.1.weight",
            "encoder.layer.0.bias",
            "decoder.head",
            "network.encoder.layer.2.weight",
        ];
        assert_eq!(
            close_matches("encoder.layer.0.weigth", names),
            [
                "encoder.layer.0.weight",
                "encoder.layer.1.weight",
                "encoder.layer.0.bias"
            ]
        );
        assert_eq!(
            close_matches("layer.2.weight", names),
            ["network.encoder.layer.2.weight"]
        );
        assert!(close_matches("zzz", names).is_empty());
        assert!(close_matches("", names).is_empty());
    }
}
