//! How every verb prints: tables for people (colours only on a terminal, and never with `NO_COLOR` set), one
//! JSON document for scripts.

use std::io::IsTerminal;

use comfy_table::{Cell, Color, Table, presets::UTF8_BORDERS_ONLY};

/// An empty table with `header`, styled for a terminal.
pub fn table<const N: usize>(header: [&str; N]) -> Table {
    let mut t = Table::new();
    t.load_preset(UTF8_BORDERS_ONLY);
    if !colours() {
        t.force_no_tty();
    }
    t.set_header(header);
    t
}

/// Whether stdout is a terminal that wants colours (`NO_COLOR`, no-color.org, turns them off).
pub fn colours() -> bool {
    std::io::stdout().is_terminal() && std::env::var_os("NO_COLOR").is_none()
}

/// A Consul-style state (`passing`, `warning`, `critical`, other) coloured green, yellow, red or not at all.
pub fn state_cell(state: &str) -> Cell {
    let cell = Cell::new(state);
    match state {
        "passing" => cell.fg(Color::Green),
        "warning" => cell.fg(Color::Yellow),
        "critical" => cell.fg(Color::Red),
        _ => cell,
    }
}

/// A success rate as a percentage, red under 95 %, yellow under 99.9 %; `-` without calls.
pub fn ratio_cell(rate: Option<f64>) -> Cell {
    match rate {
        None => Cell::new("-"),
        Some(r) => {
            let cell = Cell::new(format!("{:.2}%", r * 100.0));
            if r < 0.95 {
                cell.fg(Color::Red)
            } else if r < 0.999 {
                cell.fg(Color::Yellow)
            } else {
                cell.fg(Color::Green)
            }
        }
    }
}

/// Prints `value` as one line of JSON.
pub fn json(value: &serde_json::Value) {
    println!("{value}");
}
