//! Maintenance windows for upgrades (`packages.maintenance_windows`): when agents may start
//! downloading and installing a new package set. Outside every window no agent takes a new
//! upgrade slot (its upgrade stays `pending`, with the window as the reason); agents already
//! upgrading finish. When one opens, the waiting agents are offered their sets as slots
//! allow. No window configured: always open.
//!
//! A window is `[DAYS ]HH:MM-HH:MM` in UTC: `02:00-06:00` every day, `Sat,Sun 22:00-04:00`
//! from Saturday and Sunday 22:00 to 04:00 the next morning (the days name the start).

use std::fmt;

const DAYS: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];
const DAY_MIN: u32 = 24 * 60;

/// One window, as configured.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Monday first: the days a window may start on.
    days: [bool; 7],
    start_min: u32,
    /// Exclusive; below `start_min` when the window runs past midnight.
    end_min: u32,
}

impl Window {
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = |why: &str| format!("maintenance window `{text}`: {why}");
        let text = text.trim();
        let (days, hours) = match text.rsplit_once(' ') {
            Some((d, h)) => (Some(d.trim()), h),
            None => (None, text),
        };
        let days = match days {
            None => [true; 7],
            Some(list) => {
                let mut set = [false; 7];
                for d in list.split(',') {
                    let i = DAYS
                        .iter()
                        .position(|n| n.eq_ignore_ascii_case(d.trim()))
                        .ok_or_else(|| bad("days are Mon, Tue, Wed, Thu, Fri, Sat, Sun"))?;
                    set[i] = true;
                }
                set
            }
        };
        let (from, to) = hours
            .split_once('-')
            .ok_or_else(|| bad("hours are HH:MM-HH:MM (UTC)"))?;
        let minutes = |t: &str| -> Result<u32, String> {
            let (h, m) = t
                .trim()
                .split_once(':')
                .ok_or_else(|| bad("times are HH:MM"))?;
            let (h, m): (u32, u32) = (
                h.parse().map_err(|_| bad("times are HH:MM"))?,
                m.parse().map_err(|_| bad("times are HH:MM"))?,
            );
            if m >= 60 || h * 60 + m > DAY_MIN {
                return Err(bad("times are 00:00 to 24:00"));
            }
            Ok(h * 60 + m)
        };
        let (start_min, end_min) = (minutes(from)?, minutes(to)?);
        if start_min == end_min || start_min == DAY_MIN {
            return Err(bad("the window is empty"));
        }
        Ok(Self {
            days,
            start_min,
            end_min,
        })
    }

    /// Whether the window is open at `ms` (Unix milliseconds, UTC).
    pub fn contains(&self, ms: i64) -> bool {
        let mins = ms.div_euclid(60_000);
        let minute = u32::try_from(mins.rem_euclid(i64::from(DAY_MIN))).unwrap_or(0);
        // 1970-01-01 was a Thursday (index 3, Monday first).
        let day =
            usize::try_from((mins.div_euclid(i64::from(DAY_MIN)) + 3).rem_euclid(7)).unwrap_or(0);
        if self.start_min < self.end_min {
            self.days[day] && (self.start_min..self.end_min).contains(&minute)
        } else {
            // Past midnight: today's part started today, the early part yesterday.
            (self.days[day] && minute >= self.start_min)
                || (self.days[(day + 6) % 7] && minute < self.end_min)
        }
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.days != [true; 7] {
            let names: Vec<&str> = DAYS
                .iter()
                .zip(self.days)
                .filter(|(_, on)| *on)
                .map(|(n, _)| *n)
                .collect();
            write!(f, "{} ", names.join(","))?;
        }
        let hm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{} UTC", hm(self.start_min), hm(self.end_min))
    }
}

/// Whether upgrades may start at `ms`: inside one of `windows`, or none configured.
pub fn open(windows: &[Window], ms: i64) -> bool {
    windows.is_empty() || windows.iter().any(|w| w.contains(ms))
}

/// Why an upgrade waits: the windows, for the operator.
pub fn closed_reason(windows: &[Window]) -> String {
    let list: Vec<String> = windows.iter().map(ToString::to_string).collect();
    format!("outside the maintenance window ({})", list.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Unix ms of 2026-12-05 (a Saturday) at `h:m` UTC, plus `days`.
    fn at(days: i64, h: i64, m: i64) -> i64 {
        // 2026-12-05 is day 20_792 since the epoch.
        ((20_792 + days) * 1440 + h * 60 + m) * 60_000
    }

    #[test]
    fn windows_parse_print_and_open_at_their_hours() {
        let daily = Window::parse("02:00-06:00").expect("daily");
        assert_eq!(daily.to_string(), "02:00-06:00 UTC");
        assert!(daily.contains(at(0, 2, 0)));
        assert!(daily.contains(at(3, 5, 59)));
        assert!(!daily.contains(at(0, 6, 0)), "the end is exclusive");
        assert!(!daily.contains(at(0, 1, 59)));

        let weekend = Window::parse("sat,Sun 22:00-04:00").expect("weekend nights");
        assert_eq!(weekend.to_string(), "Sat,Sun 22:00-04:00 UTC");
        assert!(weekend.contains(at(0, 23, 0)), "Saturday night");
        assert!(
            weekend.contains(at(1, 3, 0)),
            "Sunday early: Saturday's window"
        );
        assert!(
            weekend.contains(at(2, 3, 59)),
            "Monday early: Sunday's window"
        );
        assert!(!weekend.contains(at(2, 4, 0)));
        assert!(!weekend.contains(at(2, 23, 0)), "Monday night");
        assert!(
            !weekend.contains(at(-1, 3, 0)),
            "Saturday early: Friday has none"
        );

        let all_day = Window::parse("Sun 00:00-24:00").expect("all Sunday");
        assert!(all_day.contains(at(1, 0, 0)) && all_day.contains(at(1, 23, 59)));
        assert!(!all_day.contains(at(2, 0, 0)));

        for bad in [
            "",
            "02:00",
            "2-6",
            "Xyz 02:00-06:00",
            "02:00-02:00",
            "25:00-26:00",
            "02:60-03:00",
        ] {
            assert!(Window::parse(bad).is_err(), "{bad}");
        }
        assert!(open(&[], at(0, 12, 0)), "no window: always open");
        assert!(!open(std::slice::from_ref(&daily), at(0, 12, 0)));
        assert!(open(&[daily, all_day], at(1, 12, 0)));
    }
}
