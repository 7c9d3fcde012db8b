//! `fwagent watch`: follow an upgrade, one line (or one JSON view) per
//! change, until it settles; offline, one status line.

use super::*;

pub fn watch(a: StateArgs) -> ExitCode {
    finish("watch", watch_(&a))
}

/// The phases `watch` stops at: terminal, or waiting for a reboot that no
/// amount of watching brings.
fn settled(phase: PhaseName) -> bool {
    phase.is_terminal() || phase == PhaseName::AwaitingReboot
}

fn watch_(a: &StateArgs) -> Result<u8, Failure> {
    require_state_dir(a)?;
    let paint = Paint::stdout();
    let mut client = match connect(a)? {
        Ok((live, _pid)) => live,
        Err(not_live) => return watch_offline(a, &not_live, paint),
    };
    let first: Option<JobView> = field(
        call_ok(&mut client, &Request::Status { message_id: None })?,
        "job",
    )?;
    let Some(v) = first else {
        out(if a.json {
            "null\n"
        } else {
            "no upgrade recorded yet\n"
        });
        return Ok(exit::OK);
    };
    if settled(v.phase) {
        let text = if a.json {
            json_line(&v)?
        } else {
            format!(
                "nothing under way; the last upgrade:\n{}\n",
                view::headline(&v, None, paint)
            )
        };
        out(&text);
        return Ok(exit::OK);
    }
    follow(a, &mut client, v, paint)
}

/// No agent to ask: one status line from the store, then done.
fn watch_offline(a: &StateArgs, not_live: &ClientError, paint: Paint) -> Result<u8, Failure> {
    let mut src = open_store(&a.state_dir, not_live)?;
    let latest = src.latest()?;
    let text = if a.json {
        json_line(&latest)?
    } else {
        match &latest {
            Some(v) => format!("{}\n", view::headline(v, None, paint)),
            None => "no upgrade recorded yet\n".to_string(),
        }
    };
    out(&(text + &src.footer("watch", a.json, paint)));
    Ok(exit::OK)
}

/// Poll the agent about upgrade `v` and show each change until it settles;
/// if the agent goes away, the store says how it ended.
fn follow(a: &StateArgs, client: &mut Client, mut v: JobView, paint: Paint) -> Result<u8, Failure> {
    let mut display = Display::new(&v, a.json, paint)?;
    let request = Request::Status {
        message_id: Some(v.message_id.clone()),
    };
    loop {
        display.update(&v)?;
        if settled(v.phase) {
            break;
        }
        std::thread::sleep(Display::POLL);
        v = match client.call(&request) {
            Ok(Ok(payload)) => field(payload, "job")?,
            Ok(Err(r)) => {
                display.abandon();
                return Err(Failure::unreachable(format!(
                    "the agent could not answer: {}",
                    r.error
                )));
            }
            Err(e) => {
                // The agent went away; it may have finished first (a one-shot
                // run exits once the upgrade ends): ask the store.
                let ended = ended_offline(&a.state_dir, &e, &v.message_id);
                let Some((last, detail)) = ended else {
                    display.abandon();
                    return Err(Failure::unreachable(format!(
                        "{e}; the upgrade was at {} and resumes when the agent starts again",
                        v.phase
                    )));
                };
                display.update(&last)?;
                display.finish(&last, detail.as_ref())?;
                return Ok(watch_code(last.phase));
            }
        };
    }
    // For the average rate and the last error; the agent may be gone already.
    let show = Request::Show {
        message_id: v.message_id.clone(),
    };
    let detail = match client.call(&show) {
        Ok(Ok(payload)) => field::<DetailView>(payload, "job").ok(),
        Ok(Err(_)) | Err(_) => None,
    };
    display.finish(&v, detail.as_ref())?;
    Ok(watch_code(v.phase))
}

/// `watch`'s exit code for the phase it stopped at.
fn watch_code(phase: PhaseName) -> u8 {
    match phase {
        PhaseName::Completed | PhaseName::AwaitingReboot => exit::OK,
        PhaseName::Accepted
        | PhaseName::Downloading
        | PhaseName::Verifying
        | PhaseName::Flashing
        | PhaseName::Failed
        | PhaseName::Cancelled
        | PhaseName::RolledBack => exit::REJECTED,
    }
}

/// After the agent went away: the upgrade from the store, if it had settled.
fn ended_offline(
    dir: &Path,
    gone: &ClientError,
    message_id: &str,
) -> Option<(JobView, Option<DetailView>)> {
    let Ok(Source::Offline {
        store: Some(store), ..
    }) = open_store(dir, gone)
    else {
        return None;
    };
    let detail = views::detail(&store, message_id).ok().flatten()?;
    settled(detail.job.phase).then(|| (detail.job.clone(), Some(detail)))
}

/// The recent transfer rate, from the agent's own record of when it had how
/// many bytes (`updatedAt`), over the last few seconds.
struct Rate {
    samples: VecDeque<(OffsetDateTime, u64)>,
}

impl Rate {
    const WINDOW: time::Duration = time::Duration::seconds(5);

    fn new() -> Self {
        Rate {
            samples: VecDeque::new(),
        }
    }

    fn sample(&mut self, at: OffsetDateTime, bytes: u64) -> Option<f64> {
        match self.samples.back() {
            Some(&(t, _)) if t == at => {}
            Some(&(_, b)) if b > bytes => {
                // Went back: the download started again from zero.
                self.samples.clear();
                self.samples.push_back((at, bytes));
            }
            _ => self.samples.push_back((at, bytes)),
        }
        while self.samples.len() > 2
            && self
                .samples
                .front()
                .is_some_and(|&(t, _)| at - t > Self::WINDOW)
        {
            self.samples.pop_front();
        }
        let (&(t0, b0), &(t1, b1)) = (self.samples.front()?, self.samples.back()?);
        let secs = (t1 - t0).as_seconds_f64();
        (secs >= 1.0).then(|| b1.saturating_sub(b0) as f64 / secs)
    }
}

/// How `watch` shows progress: a bar on a terminal, plain lines otherwise,
/// JSON views with `--json`.
enum Display {
    Bar {
        bar: ProgressBar,
        phase: PhaseName,
        paint: Paint,
    },
    Plain {
        last: Option<(Instant, PhaseName, u64)>,
        rate: Rate,
        paint: Paint,
    },
    Json {
        last: Option<JobView>,
    },
}

impl Display {
    const POLL: Duration = Duration::from_millis(250);
    const PLAIN_EVERY: Duration = Duration::from_secs(1);

    fn new(v: &JobView, json: bool, paint: Paint) -> Result<Display, Failure> {
        if json {
            return Ok(Display::Json { last: None });
        }
        if !std::io::stdout().is_terminal() {
            return Ok(Display::Plain {
                last: None,
                rate: Rate::new(),
                paint,
            });
        }
        // Styled and positioned before it is first drawn.
        let bar = ProgressBar::with_draw_target(Some(v.total_bytes), ProgressDrawTarget::hidden())
            .with_style(Self::bar_style(v.phase, paint)?)
            .with_message(v.phase.as_str())
            .with_position(v.bytes_done);
        bar.reset_eta();
        bar.set_draw_target(ProgressDrawTarget::stdout());
        Self::tick(&bar, v.phase);
        Ok(Display::Bar {
            bar,
            phase: v.phase,
            paint,
        })
    }

    /// Bytes, rate and ETA while downloading; bytes and time elapsed after.
    fn bar_style(phase: PhaseName, paint: Paint) -> Result<ProgressStyle, Failure> {
        let template = match (phase == PhaseName::Downloading, paint.0) {
            (true, true) => "{msg:<11.cyan.bold} [{wide_bar:.cyan/blue}] {bytes}/{total_bytes}  {binary_bytes_per_sec}  ETA {eta}",
            (true, false) => "{msg:<11} [{wide_bar}] {bytes}/{total_bytes}  {binary_bytes_per_sec}  ETA {eta}",
            (false, true) => "{msg:<11.cyan.bold} [{wide_bar:.cyan/blue}] {bytes}/{total_bytes}  {spinner} {elapsed}",
            (false, false) => "{msg:<11} [{wide_bar}] {bytes}/{total_bytes}  {spinner} {elapsed}",
        };
        Ok(ProgressStyle::with_template(template)
            .map_err(|e| Failure::unreachable(format!("progress bar template: {e}")))?
            .progress_chars("=> "))
    }

    /// A spinner keeps moving while nothing counts bytes (verify, flash).
    fn tick(bar: &ProgressBar, phase: PhaseName) {
        if phase == PhaseName::Downloading {
            bar.disable_steady_tick();
        } else {
            bar.enable_steady_tick(Duration::from_millis(120));
        }
    }

    fn update(&mut self, v: &JobView) -> Result<(), Failure> {
        match self {
            Display::Bar { bar, phase, paint } => {
                if *phase != v.phase {
                    bar.set_style(Self::bar_style(v.phase, *paint)?);
                    bar.set_message(v.phase.as_str());
                    Self::tick(bar, v.phase);
                    *phase = v.phase;
                }
                bar.set_position(v.bytes_done);
            }
            Display::Plain { last, rate, .. } => {
                let r = rate.sample(v.updated_at, v.bytes_done);
                let due = match *last {
                    None => true,
                    Some((at, phase, bytes)) => {
                        phase != v.phase
                            || (bytes != v.bytes_done && at.elapsed() >= Self::PLAIN_EVERY)
                    }
                };
                if due && !settled(v.phase) {
                    out(&format!("{}\n", view::progress_line(v, r)));
                    *last = Some((Instant::now(), v.phase, v.bytes_done));
                }
            }
            Display::Json { last } => {
                if last.as_ref() != Some(v) {
                    out(&json_line(v)?);
                    *last = Some(v.clone());
                }
            }
        }
        Ok(())
    }

    fn abandon(&self) {
        if let Display::Bar { bar, .. } = self {
            bar.abandon();
        }
    }

    /// The result, after the last update.
    fn finish(&self, v: &JobView, detail: Option<&DetailView>) -> Result<(), Failure> {
        let paint = match self {
            Display::Bar { bar, paint, .. } => {
                bar.finish_and_clear();
                *paint
            }
            Display::Plain { paint, .. } => *paint,
            Display::Json { .. } => return Ok(()),
        };
        let avg = detail.and_then(view::average_rate);
        let mut text = format!("{}\n", view::headline(v, avg, paint));
        if v.phase != PhaseName::Completed {
            if let Some(err) = detail.and_then(|d| d.last_error.as_deref()) {
                text.push_str(&format!("last error: {}\n", paint.red(err)));
            }
        }
        out(&text);
        Ok(())
    }
}
