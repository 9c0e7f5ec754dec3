//! Typing: set and cleared by members, expired by the clock, never logged.

use std::sync::Arc;
use std::time::Instant;

use super::turn::{deliver, Handled, Request, Turn};
use super::Sequencer;
use crate::clock::Now;
use crate::event;
use crate::limits::TYPING_TTL;
use crate::output::Output;

impl Sequencer {
    /// `typing`: it has no reply; the other members hear when it starts or stops.
    pub(super) fn typing(
        &mut self,
        request: &Request,
        on: bool,
        turn: &mut Turn<'_>,
    ) -> Result<(), Handled> {
        let (conv, user) = (&request.conv, &request.caller.user);
        let conversation = self.member_of(conv, user)?;
        let members = conversation.members_shared();
        let key = (conv.clone(), user.clone());
        let now = turn.now;
        let was_on = self
            .typing
            .get(&key)
            .is_some_and(|expires| *expires > now.instant);
        if on {
            let expires = now.instant + TYPING_TTL;
            self.typing.insert(key, expires);
            self.typing_expiry
                .push_back((expires, conv.clone(), user.clone()));
        } else {
            self.typing.remove(&key);
        }
        if on != was_on {
            let doc = event::typing(conv, user, on);
            deliver(turn.out, members, Some(user.clone()), doc, true);
        }
        Ok(())
    }

    /// Whoever leaves while typing stops typing, for those who remain.
    pub(super) fn stop_typing_of_leaver(
        &mut self,
        conv: &Arc<str>,
        left: &str,
        turn: &mut Turn<'_>,
    ) {
        let key = (conv.clone(), Arc::from(left));
        if self
            .typing
            .remove(&key)
            .is_some_and(|expires| expires > turn.now.instant)
        {
            let remaining = self.convs[conv].members_shared();
            let doc = event::typing(conv, left, false);
            deliver(turn.out, remaining, None, doc, true);
        }
    }

    /// Typing that expired without a fresh `on`: tell the members it stopped.
    pub fn on_tick(&mut self, now: Now, out: &mut Vec<Output>) {
        while let Some((expires, _, _)) = self.typing_expiry.front() {
            if *expires > now.instant {
                break;
            }
            let Some((expires, conv, user)) = self.typing_expiry.pop_front() else {
                break;
            };
            let key = (conv, user);
            if self.typing.get(&key) != Some(&expires) {
                continue; // refreshed or stopped since
            }
            self.typing.remove(&key);
            let (conv, user) = key;
            if let Some(conversation) = self.convs.get(&conv) {
                let doc = event::typing(&conv, &user, false);
                deliver(out, conversation.members_shared(), Some(user), doc, true);
            }
        }
    }

    pub fn next_deadline(&self) -> Option<Instant> {
        self.typing_expiry.front().map(|(at, _, _)| *at)
    }
}
