//! `gauge-agent top`: a live terminal view of the agents the running daemon meters,
//! from its `/metrics` (plain HTTP, as `targets` and `outcome` speak). `model` is
//! the pure part (parsing, per-agent rows, rates); this file does the I/O and the
//! ratatui view.

pub mod model;

use std::{
    net::SocketAddr,
    path::Path,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use ratatui::{
    Frame,
    crossterm::event::{self, Event, KeyCode, KeyEventKind, KeyModifiers},
    layout::{Constraint, Layout},
    style::{Color, Modifier, Style},
    text::Line,
    widgets::{Block, Cell, Paragraph, Row, Table},
};

use model::{COLUMNS, Model, Snapshot};

/// How long one scrape may take: a wedged daemon must not freeze the view.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(3);

/// `gauge-agent top`.
pub fn run(listen: SocketAddr, interval: Duration, token_file: Option<&Path>, once: bool) -> anyhow::Result<()> {
    let token = crate::app::read_token(token_file)?;
    let scraper = Scraper { listen, token };
    if once {
        // Fails loudly (exit 1) when the daemon cannot be read: scripts rely on it.
        let text = scraper.scrape()?;
        let mut model = Model::default();
        model.update(Snapshot::from_metrics(&text), 0.0);
        print!("{}", model::plain(&model));
        return Ok(());
    }
    // The first scrape before the screen is taken, so an unreachable daemon or a
    // missing token is a plain error on a normal terminal.
    let first = scraper.scrape()?;
    let mut terminal = ratatui::try_init().context("cannot take over the terminal (is stdout a terminal? use --once in scripts)")?;
    // `try_init` also installs a panic hook that restores the terminal; this guard
    // restores it on every other way out (errors included).
    struct Restore;
    impl Drop for Restore {
        fn drop(&mut self) {
            ratatui::restore();
        }
    }
    let _restore = Restore;
    let start = Instant::now();
    let mut model = Model::default();
    model.update(Snapshot::from_metrics(&first), 0.0);
    let mut next = start + interval;
    loop {
        terminal.draw(|frame| draw(frame, &model, listen, interval))?;
        let wait = next.saturating_duration_since(Instant::now());
        if event::poll(wait)? {
            if let Event::Key(key) = event::read()?
                && key.kind == KeyEventKind::Press
            {
                let ctrl_c = key.code == KeyCode::Char('c') && key.modifiers.contains(KeyModifiers::CONTROL);
                if ctrl_c || matches!(key.code, KeyCode::Char('q') | KeyCode::Esc) {
                    return Ok(());
                }
            }
            // Any other event (a resize, a key) just redraws.
            continue;
        }
        next = Instant::now() + interval;
        match scraper.scrape() {
            Ok(text) => model.update(Snapshot::from_metrics(&text), start.elapsed().as_secs_f64()),
            // Shown in the header; the view keeps going until the daemon is back.
            Err(error) => model.failed(format!("{error:#}")),
        }
    }
}

struct Scraper {
    listen: SocketAddr,
    token: Option<String>,
}

impl Scraper {
    fn scrape(&self) -> anyhow::Result<String> {
        let url = format!("http://{}/metrics", self.listen);
        let mut request =
            ureq::get(&url).config().http_status_as_error(false).timeout_global(Some(SCRAPE_TIMEOUT)).build();
        if let Some(token) = &self.token {
            request = request.header("authorization", format!("Bearer {token}"));
        }
        let mut response = request.call().with_context(|| {
            format!("cannot reach the daemon at {}: is `gauge-agent run` running? (use --listen if it listens elsewhere)", self.listen)
        })?;
        let status = response.status();
        let body = response.body_mut().read_to_string().context("reading the daemon's /metrics")?;
        if status == 401 {
            bail!("the daemon requires its read token (server.metrics_token_file): pass it with --token-file FILE");
        }
        if !status.is_success() {
            bail!("the daemon refused /metrics ({status}): {}", body.trim());
        }
        Ok(body)
    }
}

fn draw(frame: &mut Frame<'_>, model: &Model, listen: SocketAddr, interval: Duration) {
    let [title, health, table, footer] =
        Layout::vertical([Constraint::Length(1), Constraint::Length(1), Constraint::Min(3), Constraint::Length(1)]).areas(frame.area());
    let bold = Style::default().add_modifier(Modifier::BOLD);
    frame.render_widget(
        Paragraph::new(Line::styled(
            format!("gauge-agent top: {listen}, every {}s, scrape #{}", interval.as_secs_f64(), model.scrapes),
            bold,
        )),
        title,
    );
    let health_style = if model.error.is_some() { Style::default().fg(Color::Red) } else { Style::default() };
    frame.render_widget(Paragraph::new(Line::styled(model::health_line(model), health_style)), health);
    let rows: Vec<Row<'_>> = model
        .rows()
        .into_iter()
        .map(|r| {
            let acted = r.actions > 0.0 || r.violations > 0.0;
            let style = if acted { Style::default().fg(Color::Yellow) } else { Style::default() };
            Row::new(model::cells(r).map(Cell::from)).style(style)
        })
        .collect();
    let empty = rows.is_empty();
    // Widths fit the figures the cells hold (6 decimals of USD); the agent name and
    // the last action take what is left.
    let widths = [
        Constraint::Min(12),
        Constraint::Length(10),
        Constraint::Length(10),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(5),
        Constraint::Length(7),
        Constraint::Length(9),
        Constraint::Length(7),
        Constraint::Length(4),
        Constraint::Length(4),
        Constraint::Min(11),
        Constraint::Length(4),
        Constraint::Length(9),
        Constraint::Length(9),
        Constraint::Length(9),
    ];
    let header = Row::new(COLUMNS.map(Cell::from)).style(bold.fg(Color::Cyan));
    let title = if empty { " agents (no LLM calls seen yet) " } else { " agents, by spend rate " };
    frame.render_widget(Table::new(rows, widths).header(header).column_spacing(1).block(Block::bordered().title(title)), table);
    frame.render_widget(Paragraph::new("q / Esc / Ctrl-C: quit"), footer);
}
