//! Quick starts kept true: a crate doc's code block compared, line for line,
//! with the test function that runs it.

/// The visible lines of the first code block (not ```` ```toml ````) after
/// `heading` in a crate doc, as rustdoc shows them: `//! ` stripped, hidden
/// `# ` lines left out. Empty when there is none.
pub fn doc_block(source: &str, heading: &str) -> String {
    let lines = source
        .lines()
        .map(|l| {
            l.strip_prefix("//! ")
                .unwrap_or(l.strip_prefix("//!").unwrap_or(l))
        })
        .skip_while(|l| *l != heading);
    // (the block's opening fence, its lines)
    let mut block: Option<(&str, String)> = None;
    for line in lines {
        match &mut block {
            None if line.starts_with("```") => block = Some((line, String::new())),
            None => {}
            Some((fence, text)) if line == "```" && *fence != "```toml" => {
                return std::mem::take(text);
            }
            Some(_) if line == "```" => block = None,
            // Hidden lines are not shown.
            Some(_) if line == "#" || line.starts_with("# ") => {}
            Some((_, text)) => {
                text.push_str(line);
                text.push('\n');
            }
        }
    }
    String::new()
}

/// The lines of `source` between the lines `begin` and `end` (compared
/// trimmed), unindented by 4: a quick start's body in a test function.
pub fn between_markers(source: &str, begin: &str, end: &str) -> String {
    let mut out = String::new();
    for line in source
        .lines()
        .skip_while(|l| l.trim() != begin)
        .skip(1)
        .take_while(|l| l.trim() != end)
    {
        out.push_str(line.strip_prefix("    ").unwrap_or(line));
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::{between_markers, doc_block};

    #[test]
    fn the_shown_block_and_the_marked_lines() {
        let doc = "//! # Start\n//!\n//! ```toml\n//! x = 1\n//! ```\n//!\n//! ```\n//! # hidden\n//! let a = 1;\n//! ```\n";
        assert_eq!(doc_block(doc, "# Start"), "let a = 1;\n");
        assert_eq!(doc_block(doc, "# Missing"), "");
        let src = "fn f() {\n    // begin\n    let a = 1;\n    // end\n}\n";
        assert_eq!(between_markers(src, "// begin", "// end"), "let a = 1;\n");
    }
}
