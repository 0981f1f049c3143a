//! Turning generated tokens into the events of one request: UTF-8 reassembly, stop sequences,
//! held-back text and the non-blocking delivery rules shared by the llama and fake engines.
//!
//! The engine thread must never block on a client, so everything here uses `try_send`. A chunk
//! that does not fit stays in [`SeqOutput`] and the engine holds that one sequence (does not
//! decode it) until the client drains its channel.

use tokio::sync::mpsc::{self, error::TrySendError};

use crate::{FinishReason, GenerationEvent, TokenCount};

/// Decoded text of one sequence that has not been emitted yet.
#[derive(Debug)]
pub(crate) struct TextAssembler {
    stops: Vec<String>,
    /// Bytes of an incomplete UTF-8 character at the end of the output so far.
    bytes: Vec<u8>,
    /// Decoded text not yet emitted: it may still turn out to be the start of a stop sequence.
    pending: String,
}

impl TextAssembler {
    pub(crate) fn new(stops: Vec<String>) -> Self {
        Self {
            stops,
            bytes: Vec::new(),
            pending: String::new(),
        }
    }

    /// Appends the bytes of one token. Returns true when a stop sequence is complete; the pending
    /// text is then cut just before it.
    pub(crate) fn push(&mut self, piece: &[u8]) -> bool {
        self.bytes.extend_from_slice(piece);
        self.decode_bytes();
        let earliest = self
            .stops
            .iter()
            .filter_map(|stop| self.pending.find(stop.as_str()))
            .min();
        match earliest {
            Some(position) => {
                self.pending.truncate(position);
                self.bytes.clear();
                true
            }
            None => false,
        }
    }

    /// Moves every complete character out of `bytes`; invalid bytes become U+FFFD, an incomplete
    /// character at the end stays for the next token.
    fn decode_bytes(&mut self) {
        loop {
            match std::str::from_utf8(&self.bytes) {
                Ok(text) => {
                    self.pending.push_str(text);
                    self.bytes.clear();
                    return;
                }
                Err(error) => {
                    let valid = error.valid_up_to();
                    if let Some(Ok(text)) = self.bytes.get(..valid).map(std::str::from_utf8) {
                        self.pending.push_str(text);
                    }
                    match error.error_len() {
                        None => {
                            self.bytes.drain(..valid);
                            return;
                        }
                        Some(invalid) => {
                            self.pending.push(char::REPLACEMENT_CHARACTER);
                            self.bytes
                                .drain(..valid.saturating_add(invalid).min(self.bytes.len()));
                        }
                    }
                }
            }
        }
    }

    /// Text that can no longer be part of a stop sequence.
    pub(crate) fn take_ready(&mut self) -> String {
        let hold = self.held_suffix_bytes();
        let split = self.pending.len().saturating_sub(hold);
        if !self.pending.is_char_boundary(split) {
            return String::new();
        }
        let rest = self.pending.split_off(split);
        std::mem::replace(&mut self.pending, rest)
    }

    /// Everything, including held text and an incomplete character (lossily): the sequence ended.
    pub(crate) fn take_all(&mut self) -> String {
        if !self.bytes.is_empty() {
            self.pending.push_str(&String::from_utf8_lossy(&self.bytes));
            self.bytes.clear();
        }
        std::mem::take(&mut self.pending)
    }

    /// Length of the longest suffix of `pending` that is a proper prefix of some stop sequence.
    fn held_suffix_bytes(&self) -> usize {
        let mut hold = 0;
        for stop in &self.stops {
            let longest = stop.len().saturating_sub(1).min(self.pending.len());
            for prefix_len in (hold + 1..=longest).rev() {
                let Some(prefix) = stop.get(..prefix_len) else {
                    continue;
                };
                if self.pending.ends_with(prefix) {
                    hold = prefix_len;
                    break;
                }
            }
        }
        hold
    }
}

/// What happened when the engine tried to deliver a sequence's buffered events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Delivery {
    /// Nothing is buffered any more (and `Done` went out if the sequence finished).
    Drained,
    /// The client's channel is full: hold this sequence.
    Held,
    /// The client went away: free the sequence.
    Closed,
}

/// The output side of one running sequence.
#[derive(Debug)]
pub(crate) struct SeqOutput {
    tx: mpsc::Sender<GenerationEvent>,
    text: TextAssembler,
    unsent_text: String,
    unsent_tokens: TokenCount,
    completion_tokens: TokenCount,
    max_tokens: TokenCount,
    prompt_tokens: TokenCount,
    cached_prompt_tokens: TokenCount,
    finish: Option<FinishReason>,
    done_sent: bool,
    prefill_started: crate::PrefillStart,
}

impl SeqOutput {
    pub(crate) fn new(
        tx: mpsc::Sender<GenerationEvent>,
        stops: Vec<String>,
        max_tokens: TokenCount,
        prompt_tokens: TokenCount,
    ) -> Self {
        assert!(max_tokens > 0, "max_tokens is validated at submit");
        Self {
            tx,
            text: TextAssembler::new(stops),
            unsent_text: String::new(),
            unsent_tokens: 0,
            completion_tokens: 0,
            max_tokens,
            prompt_tokens,
            cached_prompt_tokens: 0,
            finish: None,
            done_sent: false,
            prefill_started: crate::PrefillStart::default(),
        }
    }

    /// The moment the gateway reads from the sequence's `Generation`.
    pub(crate) fn prefill_clock(&self) -> crate::PrefillStart {
        self.prefill_started.clone()
    }

    /// The sequence left the queue: its prefill begins now.
    pub(crate) fn mark_prefill_started(&self) {
        self.prefill_started.mark();
    }

    pub(crate) fn set_cached_prompt_tokens(&mut self, cached: TokenCount) {
        assert!(
            cached <= self.prompt_tokens,
            "cannot reuse more than the prompt"
        );
        self.cached_prompt_tokens = cached;
    }

    /// Completion tokens generated so far (end-of-generation tokens are not counted).
    pub(crate) fn completion_tokens(&self) -> TokenCount {
        self.completion_tokens
    }

    pub(crate) fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    pub(crate) fn is_finished(&self) -> bool {
        self.finish.is_some()
    }

    pub(crate) fn is_done_sent(&self) -> bool {
        self.done_sent
    }

    /// The model emitted an end-of-generation token. It has no text and is not counted.
    pub(crate) fn on_end_of_generation(&mut self) {
        assert!(
            self.finish.is_none(),
            "a finished sequence generates nothing"
        );
        let rest = self.text.take_all();
        self.unsent_text.push_str(&rest);
        self.finish = Some(FinishReason::Stop);
    }

    /// One generated token with its text. Returns true while the sequence should go on.
    pub(crate) fn on_token(&mut self, piece: &[u8]) -> bool {
        assert!(
            self.finish.is_none(),
            "a finished sequence generates nothing"
        );
        assert!(
            self.completion_tokens < self.max_tokens,
            "generated past max_tokens"
        );
        self.completion_tokens += 1;
        self.unsent_tokens += 1;
        if self.text.push(piece) {
            let before_stop = self.text.take_all();
            self.unsent_text.push_str(&before_stop);
            self.finish = Some(FinishReason::Stop);
            return false;
        }
        if self.completion_tokens == self.max_tokens {
            let rest = self.text.take_all();
            self.unsent_text.push_str(&rest);
            self.finish = Some(FinishReason::Length);
            return false;
        }
        let ready = self.text.take_ready();
        self.unsent_text.push_str(&ready);
        true
    }

    /// Sends what is buffered without waiting. Tokens whose text is still held back ride along
    /// with the next chunk that has text; tokens swallowed by a stop sequence are only counted in
    /// `Done`.
    pub(crate) fn deliver(&mut self) -> Delivery {
        if !self.unsent_text.is_empty() {
            let event = GenerationEvent::Chunk {
                text: std::mem::take(&mut self.unsent_text),
                tokens: std::mem::take(&mut self.unsent_tokens),
            };
            match self.tx.try_send(event) {
                Ok(()) => {}
                Err(TrySendError::Full(event)) => {
                    if let GenerationEvent::Chunk { text, tokens } = event {
                        self.unsent_text = text;
                        self.unsent_tokens = tokens;
                    }
                    return Delivery::Held;
                }
                Err(TrySendError::Closed(_)) => return Delivery::Closed,
            }
        }
        let Some(finish_reason) = self.finish else {
            return Delivery::Drained;
        };
        if self.done_sent {
            return Delivery::Drained;
        }
        let done = GenerationEvent::Done {
            finish_reason,
            prompt_tokens: self.prompt_tokens,
            cached_prompt_tokens: Some(self.cached_prompt_tokens),
            completion_tokens: self.completion_tokens,
        };
        match self.tx.try_send(done) {
            Ok(()) => {
                self.done_sent = true;
                Delivery::Drained
            }
            Err(TrySendError::Full(_)) => Delivery::Held,
            Err(TrySendError::Closed(_)) => Delivery::Closed,
        }
    }

    /// Reports a failure; best effort, since a full or closed channel cannot take it.
    pub(crate) fn fail(&self, error: crate::EngineError) {
        if self.tx.try_send(GenerationEvent::Failed(error)).is_err() {
            tracing::debug!("could not deliver an engine failure: channel full or closed");
        }
    }

    /// Reports a failure if the channel has room; `false` when it is full (try again later). A
    /// client that left counts as told.
    pub(crate) fn try_fail(&self, error: &crate::EngineError) -> bool {
        !matches!(
            self.tx.try_send(GenerationEvent::Failed(error.clone())),
            Err(TrySendError::Full(_))
        )
    }

    pub(crate) fn prompt_tokens(&self) -> TokenCount {
        self.prompt_tokens
    }

    pub(crate) fn cached_prompt_tokens(&self) -> TokenCount {
        self.cached_prompt_tokens
    }

    pub(crate) fn max_tokens(&self) -> TokenCount {
        self.max_tokens
    }
}

/// Tells each client in `owed` that its engine restarted, retrying full channels every
/// `retry` until `until` (the restart backoff's end); past it, one last best-effort try.
pub(crate) fn fail_owed_until(
    mut owed: Vec<SeqOutput>,
    until: std::time::Instant,
    retry: std::time::Duration,
) {
    loop {
        owed.retain(|output| !output.try_fail(&crate::EngineError::Restarted));
        let now = std::time::Instant::now();
        if now >= until {
            break;
        }
        let wait = if owed.is_empty() {
            until - now
        } else {
            retry.min(until - now)
        };
        std::thread::sleep(wait);
    }
    for output in &owed {
        output.fail(crate::EngineError::Restarted);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stops(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn holds_text_that_could_start_a_stop_sequence() {
        let mut text = TextAssembler::new(stops(&["</end>"]));
        assert!(!text.push(b"hello </"));
        assert_eq!(text.take_ready(), "hello ");
        assert!(!text.push(b"e"));
        assert_eq!(text.take_ready(), "");
        assert!(text.push(b"nd> tail"));
        assert_eq!(text.take_all(), "");
    }

    #[test]
    fn releases_held_text_when_it_is_not_a_stop() {
        let mut text = TextAssembler::new(stops(&["STOP"]));
        assert!(!text.push(b"a ST"));
        assert_eq!(text.take_ready(), "a ");
        assert!(!text.push(b"ay"));
        assert_eq!(text.take_ready(), "STay");
    }

    #[test]
    fn stop_inside_one_piece_cuts_the_rest() {
        let mut text = TextAssembler::new(stops(&["\n\n", "xyz"]));
        assert!(text.push(b"abc xyz def\n\n"));
        assert_eq!(text.take_all(), "abc ");
    }

    #[test]
    fn incomplete_utf8_is_held_until_complete() {
        let mut text = TextAssembler::new(Vec::new());
        let snowman = "☃".as_bytes();
        assert!(!text.push(&snowman[..1]));
        assert_eq!(text.take_ready(), "");
        assert!(!text.push(&snowman[1..]));
        assert_eq!(text.take_ready(), "☃");
    }

    #[test]
    fn invalid_utf8_becomes_replacement_character() {
        let mut text = TextAssembler::new(Vec::new());
        assert!(!text.push(&[0xff, b'a']));
        assert_eq!(text.take_ready(), "\u{fffd}a");
    }

    #[test]
    fn multibyte_stop_prefix_is_held() {
        let mut text = TextAssembler::new(stops(&["é!"]));
        assert!(!text.push("caf".as_bytes()));
        assert!(!text.push("é".as_bytes()));
        assert_eq!(text.take_ready(), "caf");
        assert!(text.push(b"!"));
        assert_eq!(
            text.take_all(),
            "",
            "only the held text was left, and it was the stop"
        );
    }

    #[test]
    fn full_channel_holds_and_keeps_the_chunk() {
        let (tx, mut rx) = mpsc::channel(1);
        let mut out = SeqOutput::new(tx, Vec::new(), 3, 5);
        assert!(out.on_token(b"a"));
        assert_eq!(out.deliver(), Delivery::Drained);
        assert!(out.on_token(b"b"));
        assert_eq!(out.deliver(), Delivery::Held);
        assert_eq!(
            rx.try_recv().ok(),
            Some(GenerationEvent::Chunk {
                text: "a".to_owned(),
                tokens: 1
            })
        );
        assert_eq!(out.deliver(), Delivery::Drained);
        assert!(!out.on_token(b"c"));
        assert_eq!(out.deliver(), Delivery::Held);
        assert_eq!(
            rx.try_recv().ok(),
            Some(GenerationEvent::Chunk {
                text: "b".to_owned(),
                tokens: 1
            })
        );
        assert_eq!(
            out.deliver(),
            Delivery::Held,
            "Done waits behind the last chunk"
        );
        assert_eq!(
            rx.try_recv().ok(),
            Some(GenerationEvent::Chunk {
                text: "c".to_owned(),
                tokens: 1
            })
        );
        assert_eq!(out.deliver(), Delivery::Drained);
        assert_eq!(
            rx.try_recv().ok(),
            Some(GenerationEvent::Done {
                finish_reason: FinishReason::Length,
                prompt_tokens: 5,
                cached_prompt_tokens: Some(0),
                completion_tokens: 3,
            })
        );
        drop(rx);
        assert!(out.is_closed());
    }
}
