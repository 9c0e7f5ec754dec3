//! Messages under kill -9 during send bursts, with and without state snapshots.

use super::*;

#[test]
fn kill_9_during_send_bursts_loses_nothing_acknowledged() {
    assert_no_restart_loaded_a_snapshot(&kill_9_rounds(&[]));
}

/// The same with frequent state snapshots: recovery starts from a snapshot and replays
/// only the log after it, and still loses nothing.
#[test]
fn kill_9_with_state_snapshots_loses_nothing_acknowledged() {
    assert_some_restart_loaded_a_snapshot(&kill_9_rounds(&["--snapshot-every-records", "100"]));
}

/// Rounds of: burst, kill -9, restart, verify. Returns each restart's log lines.
fn kill_9_rounds(extra: &[&str]) -> Vec<Vec<String>> {
    let started = Instant::now();
    let mut restarts = Vec::new();
    let mut daemon = start_with(tempfile::tempdir().expect("tempdir"), extra);
    let convs = make_conversations(&daemon, "k");
    let mut model = Model::default();
    // Acknowledged sends (all clients together) after which each round's kill comes.
    let kill_after = [350, 120, 600];
    for (round, &threshold) in kill_after.iter().enumerate() {
        // Every sender of every conversation, plus a second device for two of them.
        let mut clients: Vec<(String, String, Vec<String>)> = Vec::new();
        for conv in &convs {
            for user in &conv.senders {
                match clients.iter_mut().find(|(u, _, _)| u == user) {
                    Some((_, _, targets)) => targets.push(conv.id.clone()),
                    None => clients.push((user.clone(), "phone".into(), vec![conv.id.clone()])),
                }
            }
        }
        let second: Vec<_> = clients
            .iter()
            .step_by(2)
            .map(|(user, _, targets)| (user.clone(), "laptop".to_string(), targets.clone()))
            .collect();
        clients.extend(second);

        let (acks, acked) = mpsc::channel();
        let threads: Vec<_> = clients
            .into_iter()
            .map(|(user, device, targets)| {
                let client = session(&daemon, &user, &device);
                let acks = acks.clone();
                std::thread::spawn(move || burst(client, user, device, targets, round, acks))
            })
            .collect();
        drop(acks);
        for count in 0..threshold {
            if acked.recv_timeout(WAIT).is_err() {
                panic!("round {round}: acknowledgements stalled after {count} (or every sender stopped)");
            }
        }
        let data_dir = kill9(&mut daemon);
        let mut round_acked = 0;
        let mut round_unacked = 0;
        let mut problems = Vec::new();
        for thread in threads {
            let mut report = thread.join().expect("burst thread");
            problems.append(&mut report.problems);
            round_unacked += report.unacked.len();
            round_acked += model.absorb(report);
        }
        assert!(problems.is_empty(), "round {round}: {problems:#?}");
        assert!(round_acked >= threshold);

        daemon = start_with(data_dir, extra);
        restarts.push(daemon.startup.clone());
        let when = format!("round {round} after kill -9");
        let survived = verify(&daemon, &convs, &mut model, &when);
        let (retried, recognised) = resend(&daemon, &mut model, &when);
        assert_eq!(survived + retried, round_unacked, "{when}");
        assert_eq!(model.pending_count(), 0);
        // The retries and duplicates changed nothing else.
        verify(
            &daemon,
            &convs,
            &mut model,
            &format!("{when}, after resends"),
        );
        let total: usize = model.known.values().map(BTreeMap::len).sum();
        eprintln!(
            "round {round}: {round_acked} acked, {round_unacked} unanswered at the kill \
             ({survived} were durable, {retried} resent), {recognised} acked resends \
             recognised; {total} messages in all, {:?} so far",
            started.elapsed()
        );
    }
    restarts
}
