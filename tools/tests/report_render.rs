//! The HTML report as a browser draws it: render a realistic `Report`, screenshot the page
//! with headless Chromium, and check the picture has the plots in it.
//!
//! The unit tests in `load::html` check the markup; only a real browser shows that the
//! inline SVG actually draws (a malformed attribute silently blanks a plot). Chromium is
//! required: without it this test fails and says how to install it, so a missing browser
//! can't pass for a working report.

use std::collections::BTreeMap;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use parley_tools::load::html::render;
use parley_tools::load::report::*;

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 2000;
/// Chromium normally takes a few seconds; past this it is hung, not slow.
const CHROMIUM_LIMIT: Duration = Duration::from_secs(60);

/// The colours the report's plot lines use (latency curves, sent/acked/delivered, p50/p99).
const LINE_COLOURS: [(&str, [u8; 3]); 4] = [
    ("blue #0072B2", [0x00, 0x72, 0xB2]),
    ("vermillion #D55E00", [0xD5, 0x5E, 0x00]),
    ("green #009E73", [0x00, 0x9E, 0x73]),
    ("orange #E69F00", [0xE6, 0x9F, 0x00]),
];

/// A deterministic stand-in for noise, so the plots look like measurements.
struct Lcg(u64);

impl Lcg {
    /// Uniform in 0..1.
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (self.0 >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A latency histogram (nanoseconds) with a body around `typical_us` and a long tail.
fn latency(name: &str, typical_us: f64, samples: u32, rng: &mut Lcg) -> LatencySummary {
    let mut histogram = Histogram::<u64>::new(3).unwrap();
    for _ in 0..samples {
        let u = rng.next();
        // Mostly near typical, with a heavy tail: 1% up to 30x, 0.1% up to 300x.
        let factor = if u < 0.99 {
            0.6 + rng.next()
        } else if u < 0.999 {
            2.0 + 28.0 * rng.next()
        } else {
            30.0 + 270.0 * rng.next()
        };
        histogram
            .record((typical_us * factor * 1000.0) as u64)
            .unwrap();
    }
    LatencySummary::from_histogram(name, &histogram)
}

fn realistic_report() -> Report {
    let mut rng = Lcg(7);
    let strings = |pairs: &[(&str, &str)]| -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|&(k, v)| (k.to_string(), v.to_string()))
            .collect()
    };
    // A group scenario of 3 members: each message is delivered to 2 other sessions.
    let timeline = (0..30)
        .map(|t| {
            let sent = 5000 + (400.0 * (rng.next() - 0.5)) as u64;
            let acked = sent - (20.0 * rng.next()) as u64;
            let hiccup = if t == 17 { 6.0 } else { 1.0 };
            Second {
                t,
                sent,
                acked,
                delivered: 2 * acked,
                errors: u64::from(t == 17),
                p50_us: (180.0 + 40.0 * rng.next()) * hiccup,
                p99_us: (900.0 + 400.0 * rng.next()) * hiccup,
            }
        })
        .collect();
    Report {
        scenario: "group".into(),
        params: strings(&[
            ("--connections", "3000"),
            ("--rate", "5000"),
            ("--group-size", "3"),
            ("--duration", "30s"),
            ("--target", "ws://127.0.0.1:8080/ws"),
            ("--label", "<b>not bold</b> & \"quoted\""),
        ]),
        started_unix_s: 1_767_225_600,
        host: strings(&[
            ("cpus", "16"),
            ("kernel", "6.1.0-18-amd64"),
            ("hostname", "loadbox"),
        ]),
        connections: Connections {
            target: 3000,
            established: 3000,
            failed_attempts: 2,
            sources: 1,
            setup_s: 1.8,
        },
        measured_s: 30.0,
        throughput: Throughput {
            offered_per_s: 5000.0,
            sent_per_s: 4998.2,
            acked_per_s: 4988.9,
            delivered_per_s: 9977.8,
            replies_per_s: 4988.9,
        },
        latencies: vec![
            latency("e2e", 200.0, 150_000, &mut rng),
            latency("ack", 120.0, 150_000, &mut rng),
            latency("connect", 900.0, 3000, &mut rng),
        ],
        timeline,
        errors: [
            ("close:4009".to_string(), 1),
            ("rate_limited".to_string(), 3),
        ]
        .into(),
        verification: Verification {
            checked: true,
            ok: true,
            missing: 0,
            out_of_order: 0,
            duplicates: 12,
            detail: vec!["12 duplicates after resume of session 1041".into()],
        },
        server: Some(ServerUsage {
            pid: 4242,
            rss_kib_before: 80_000,
            rss_kib_after: 152_000,
            rss_bytes_per_session: 24_576.0,
            cpu_s: 21.5,
        }),
        generator: GeneratorUsage {
            workers: 4,
            cpu_s: 9.1,
            rss_kib: 64_000,
        },
        extra: [("fanout".to_string(), 2.0)].into(),
        stop: Default::default(),
    }
}

/// `chromium` on PATH, or a failure that says how to get it.
fn chromium() -> PathBuf {
    let found = std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .map(|dir| dir.join("chromium"))
            .find(|candidate| candidate.is_file())
    });
    found.unwrap_or_else(|| {
        panic!(
            "`chromium` is not on PATH: this test screenshots the HTML report with headless \
             Chromium. Install Debian's `chromium` package (`sudo apt-get install chromium`; \
             tools/test-all.sh installs it)."
        )
    })
}

/// Screenshot `html` into `png`, killing Chromium if it runs past the limit.
fn screenshot(html: &Path, png: &Path, scratch: &Path) {
    let stderr_path = scratch.join("chromium.stderr");
    let mut child = Command::new(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            "--no-first-run",
            &format!("--window-size={WIDTH},{HEIGHT}"),
            // A fresh profile: no state from, or lock contention with, another Chromium.
            &format!("--user-data-dir={}", scratch.join("profile").display()),
            &format!("--screenshot={}", png.display()),
            &format!("file://{}", html.display()),
        ])
        // Its own process group, so a hung run can be killed with all its helpers
        // (zygote, renderer, GPU process), not just the browser process.
        .process_group(0)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // Chromium is chatty on stderr; keep it in a file (a pipe nobody reads could fill
        // up and stall it) and show it only if the run fails.
        .stderr(std::fs::File::create(&stderr_path).unwrap())
        .spawn()
        .expect("start chromium");
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for chromium") {
            break status;
        }
        if started.elapsed() > CHROMIUM_LIMIT {
            // SAFETY: kill(2) with a negative pid signals the process group this test
            // created above (Chromium's pid is its group id); no memory is involved.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = child.wait();
            panic!(
                "chromium did not finish within {CHROMIUM_LIMIT:?}; stderr:\n{}",
                std::fs::read_to_string(&stderr_path).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(
        status.success() && png.is_file(),
        "chromium failed ({status}) or wrote no screenshot; stderr:\n{}",
        std::fs::read_to_string(&stderr_path).unwrap_or_default()
    );
}

/// A decoded screenshot as RGB pixels.
struct Image {
    width: u32,
    height: u32,
    rgb: Vec<[u8; 3]>,
}

fn decode(path: &Path) -> Image {
    let mut decoder =
        png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
    // Expand palettes and low bit depths, strip 16-bit to 8: one byte per channel.
    decoder.set_transformations(png::Transformations::EXPAND | png::Transformations::STRIP_16);
    let mut reader = decoder.read_info().expect("screenshot is a PNG");
    let mut buffer = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buffer).expect("screenshot decodes");
    let bytes = &buffer[..frame.buffer_size()];
    let rgb = match frame.color_type {
        png::ColorType::Rgb => bytes.chunks_exact(3).map(|p| [p[0], p[1], p[2]]).collect(),
        // Chromium's page background is opaque, so alpha can be ignored.
        png::ColorType::Rgba => bytes.chunks_exact(4).map(|p| [p[0], p[1], p[2]]).collect(),
        png::ColorType::Grayscale => bytes.iter().map(|&g| [g, g, g]).collect(),
        png::ColorType::GrayscaleAlpha => bytes.chunks_exact(2).map(|p| [p[0]; 3]).collect(),
        png::ColorType::Indexed => unreachable!("EXPAND turns palettes into RGB"),
    };
    Image {
        width: frame.width,
        height: frame.height,
        rgb,
    }
}

/// Close enough to `target` to be that line's colour (allows for anti-aliasing).
fn near(pixel: [u8; 3], target: [u8; 3]) -> bool {
    pixel
        .iter()
        .zip(target)
        .map(|(&a, b)| (i32::from(a) - i32::from(b)).pow(2))
        .sum::<i32>()
        <= 24 * 24
}

#[test]
fn report_screenshot_shows_the_plots() {
    let dir = tempfile::tempdir().unwrap();
    let html_path = dir.path().join("report.html");
    let png_path = dir.path().join("report.png");
    let html = render(&realistic_report());
    std::fs::write(&html_path, &html).unwrap();

    screenshot(&html_path, &png_path, dir.path());
    // Keep a copy to look at when asked to (PARLEY_REPORT_SCREENSHOT=/tmp/report.png).
    if let Some(keep) = std::env::var_os("PARLEY_REPORT_SCREENSHOT") {
        std::fs::copy(&png_path, keep).unwrap();
    }

    let image = decode(&png_path);
    assert_eq!(image.width, WIDTH, "screenshot width");
    assert_eq!(image.height, HEIGHT, "screenshot height");
    assert_eq!(image.rgb.len(), (WIDTH * HEIGHT) as usize);

    // Every line colour must be drawn, and by more than its legend swatch (a 22-pixel
    // stroke), so the lines themselves made it to the screen.
    let (mut top, mut bottom, mut left, mut right) = (u32::MAX, 0, u32::MAX, 0);
    for (name, colour) in LINE_COLOURS {
        let mut count = 0;
        for (i, &pixel) in image.rgb.iter().enumerate() {
            if near(pixel, colour) {
                count += 1;
                let (x, y) = (i as u32 % WIDTH, i as u32 / WIDTH);
                (top, bottom) = (top.min(y), bottom.max(y));
                (left, right) = (left.min(x), right.max(x));
            }
        }
        eprintln!("{name}: {count} pixels");
        assert!(
            count >= 400,
            "plot line colour {name} covers only {count} pixels"
        );
    }

    // The lines span the three plots: the distribution across the page, the two
    // timelines side by side under it.
    eprintln!("plot lines cover x {left}..{right}, y {top}..{bottom}");
    assert!(
        bottom - top >= 500 && right - left >= 900,
        "plot lines only cover x {left}..{right}, y {top}..{bottom}"
    );

    // That area is a drawing, not a blank page: grid, axes, labels and lines.
    let mut non_white = 0usize;
    let mut colours = std::collections::HashSet::new();
    for y in top..=bottom {
        for x in left..=right {
            let pixel = image.rgb[(y * WIDTH + x) as usize];
            if pixel.iter().any(|&c| c < 245) {
                non_white += 1;
            }
            colours.insert(pixel);
        }
    }
    let area = ((bottom - top + 1) * (right - left + 1)) as usize;
    let fraction = non_white as f64 / area as f64;
    eprintln!(
        "plot area: {:.1}% drawn on, {} distinct colours",
        fraction * 100.0,
        colours.len()
    );
    assert!(
        fraction > 0.05,
        "only {:.1}% of the plot area is drawn on",
        fraction * 100.0
    );
    assert!(
        colours.len() > 100,
        "only {} distinct colours in the plot area",
        colours.len()
    );
}
