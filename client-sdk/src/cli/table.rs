//! Plain-text tables whose columns line up when cells mix Chinese and Latin text.
//!
//! Terminals draw CJK characters two columns wide, so padding by `chars().count()` misaligns every row
//! that holds a Chinese name. Widths here are display widths ([`unicode_width`]), and a column may be
//! capped: longer cells are cut at a character boundary and end with `…`.

use unicode_width::{UnicodeWidthChar, UnicodeWidthStr};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    Left,
    Right,
}

#[derive(Clone, Debug)]
struct Column {
    header: String,
    align: Align,
    max_width: Option<usize>,
}

/// A table built row by row and rendered once all widths are known.
#[derive(Clone, Debug, Default)]
pub struct Table {
    columns: Vec<Column>,
    rows: Vec<Vec<String>>,
}

/// Space between columns.
const GAP: &str = "  ";

impl Table {
    pub fn new(headers: &[&str]) -> Self {
        Table {
            columns: headers
                .iter()
                .map(|h| Column { header: h.to_string(), align: Align::Left, max_width: None })
                .collect(),
            rows: Vec::new(),
        }
    }

    /// Right-aligns column `index` (numbers).
    pub fn align(mut self, index: usize, align: Align) -> Self {
        self.columns[index].align = align;
        self
    }

    /// Caps column `index` at `width` display columns.
    pub fn max_width(mut self, index: usize, width: usize) -> Self {
        self.columns[index].max_width = Some(width.max(2));
        self
    }

    /// Adds a row; missing cells are empty, extra cells are dropped.
    pub fn row<I, S>(&mut self, cells: I)
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let mut row: Vec<String> = cells.into_iter().map(Into::into).take(self.columns.len()).collect();
        row.resize(self.columns.len(), String::new());
        self.rows.push(row);
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// The table as lines of text, header first, each ending in a newline; no trailing spaces.
    pub fn render(&self) -> String {
        let cells: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|row| {
                row.iter()
                    .zip(&self.columns)
                    .map(|(cell, col)| {
                        let cell = single_line(cell);
                        match col.max_width {
                            Some(w) => truncate_to_width(&cell, w),
                            None => cell,
                        }
                    })
                    .collect()
            })
            .collect();
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(i, col)| cells.iter().map(|r| r[i].width()).chain([col.header.width()]).max().unwrap_or(0))
            .collect();
        let mut out = String::new();
        let headers: Vec<String> = self.columns.iter().map(|c| c.header.clone()).collect();
        for row in std::iter::once(&headers).chain(cells.iter()) {
            let mut line = String::new();
            for (i, cell) in row.iter().enumerate() {
                if i > 0 {
                    line.push_str(GAP);
                }
                let pad = widths[i] - cell.width();
                match self.columns[i].align {
                    Align::Left => {
                        line.push_str(cell);
                        line.extend(std::iter::repeat_n(' ', pad));
                    }
                    Align::Right => {
                        line.extend(std::iter::repeat_n(' ', pad));
                        line.push_str(cell);
                    }
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        out
    }
}

/// Newlines and tabs in a cell would break the grid.
fn single_line(s: &str) -> String {
    if s.contains(['\n', '\r', '\t']) {
        s.split(['\n', '\r', '\t']).filter(|p| !p.is_empty()).collect::<Vec<_>>().join(" ")
    } else {
        s.to_string()
    }
}

/// Cuts `s` to at most `max` display columns, ending in `…` when anything was cut. A wide character that
/// would straddle the limit is left out rather than split.
pub fn truncate_to_width(s: &str, max: usize) -> String {
    if s.width() <= max {
        return s.to_string();
    }
    let budget = max.saturating_sub(1); // room for the ellipsis (one column)
    let mut out = String::new();
    let mut used = 0;
    for c in s.chars() {
        let w = c.width().unwrap_or(0);
        if used + w > budget {
            break;
        }
        used += w;
        out.push(c);
    }
    out.push('…');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chinese_cells_line_up() {
        let mut t = Table::new(&["code", "name", "score"]).align(2, Align::Right);
        t.row(["101001/000001", "企业登记信息", "12.5"]);
        t.row(["302001/000001", "行政处罚信息 (conditional)", "3.25"]);
        t.row(["1/000001", "abc", "100.00"]);
        let text = t.render();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4);
        // Every row ends at the same display column: right-aligned score column.
        let widths: Vec<usize> = lines.iter().map(|l| l.width()).collect();
        assert!(widths.iter().all(|w| *w == widths[0]), "{text}\n{widths:?}");
        // The name column starts at the same display column on every line.
        assert!(lines[0].starts_with("code           name"), "{text}");
        assert!(lines[3].starts_with("1/000001       abc"), "{text}");
        // CJK cells are padded by display width, not by character count.
        assert!(lines[1].starts_with("101001/000001  企业登记信息                "), "{text}");
    }

    #[test]
    fn long_cells_are_cut_by_display_width() {
        assert_eq!(truncate_to_width("企业登记信息", 12), "企业登记信息");
        assert_eq!(truncate_to_width("企业登记信息", 11), "企业登记信…");
        assert_eq!(truncate_to_width("企业登记信息", 10), "企业登记…");
        assert_eq!(truncate_to_width("abcdef", 4), "abc…");
        let mut t = Table::new(&["name", "x"]).max_width(0, 6);
        t.row(["纳税信用等级评价结果", "1"]);
        assert_eq!(t.render().lines().nth(1).unwrap(), "纳税…  1");
    }

    #[test]
    fn no_trailing_spaces_and_missing_cells_are_empty() {
        let mut t = Table::new(&["a", "b"]);
        t.row(["x"]);
        t.row(["line\nbreak", "y"]);
        let text = t.render();
        assert!(text.lines().all(|l| !l.ends_with(' ')), "{text:?}");
        assert!(text.contains("line break  y"), "{text}");
    }
}
