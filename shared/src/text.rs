//! Turning generated token bytes into visible text, with stop sequences.
//!
//! Tokens can split UTF-8 characters, and a stop sequence can span tokens, so text is released
//! only when it is complete and cannot be the start of a stop sequence.

/// What [`TextStream::push`] produced.
#[derive(Debug, PartialEq, Eq)]
pub enum Pushed {
    /// Text that is safe to show now (may be empty).
    Text(String),
    /// A stop sequence matched: show this text, then end generation.
    Stopped(String),
}

/// Incremental decoder with stop-sequence matching.
#[derive(Debug, Default)]
pub struct TextStream {
    undecoded: Vec<u8>,
    held: String,
    stops: Vec<String>,
}

impl TextStream {
    /// A stream that ends on any of `stops` (empty strings are ignored).
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            ..Self::default()
        }
    }

    /// Adds the bytes of one token.
    pub fn push(&mut self, bytes: &[u8]) -> Pushed {
        self.undecoded.extend_from_slice(bytes);
        self.decode_complete();
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.held.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            let text = self.held[..at].to_string();
            self.held.clear();
            return Pushed::Stopped(text);
        }
        let keep = self.held_back_len();
        let release = self.held.len() - keep;
        let text = self.held[..release].to_string();
        self.held.drain(..release);
        Pushed::Text(text)
    }

    /// Everything still held back, at the end of generation.
    pub fn finish(&mut self) -> String {
        let mut text = std::mem::take(&mut self.held);
        text.push_str(&String::from_utf8_lossy(&std::mem::take(
            &mut self.undecoded,
        )));
        text
    }

    /// Moves the longest valid UTF-8 prefix of `undecoded` into `held`, replacing invalid bytes.
    fn decode_complete(&mut self) {
        loop {
            match std::str::from_utf8(&self.undecoded) {
                Ok(text) => {
                    self.held.push_str(text);
                    self.undecoded.clear();
                    return;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // from_utf8 just said these bytes are valid, so nothing is replaced here.
                    self.held
                        .push_str(&String::from_utf8_lossy(&self.undecoded[..valid]));
                    match e.error_len() {
                        Some(bad) => {
                            self.held.push(char::REPLACEMENT_CHARACTER);
                            self.undecoded.drain(..valid + bad);
                        }
                        None => {
                            // An incomplete character at the end: wait for the next token.
                            self.undecoded.drain(..valid);
                            return;
                        }
                    }
                }
            }
        }
    }

    /// Length of the longest suffix of `held` that is a proper prefix of a stop sequence.
    fn held_back_len(&self) -> usize {
        let mut keep = 0;
        for stop in &self.stops {
            for (i, _) in self.held.char_indices() {
                let suffix = &self.held[i..];
                if suffix.len() < stop.len() && stop.starts_with(suffix) {
                    keep = keep.max(suffix.len());
                    break;
                }
            }
        }
        keep
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_text_flows_through() {
        let mut s = TextStream::new(&[]);
        assert_eq!(s.push(b"Hello"), Pushed::Text("Hello".into()));
        assert_eq!(s.push(b" world"), Pushed::Text(" world".into()));
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn split_utf8_waits_for_the_rest() {
        let mut s = TextStream::new(&[]);
        let e = "é".as_bytes();
        assert_eq!(s.push(&e[..1]), Pushed::Text(String::new()));
        assert_eq!(s.push(&e[1..]), Pushed::Text("é".into()));
        assert_eq!(s.push(&[0xff, b'a']), Pushed::Text("\u{fffd}a".into()));
    }

    #[test]
    fn stop_sequence_across_tokens() {
        let mut s = TextStream::new(&["END".to_string()]);
        assert_eq!(s.push(b"abc E"), Pushed::Text("abc ".into()));
        assert_eq!(s.push(b"N"), Pushed::Text(String::new()));
        assert_eq!(s.push(b"Dxyz"), Pushed::Stopped(String::new()));
    }

    #[test]
    fn false_start_is_released() {
        let mut s = TextStream::new(&["END".to_string()]);
        assert_eq!(s.push(b"E"), Pushed::Text(String::new()));
        assert_eq!(s.push(b"x"), Pushed::Text("Ex".into()));
        assert_eq!(s.push(b"EN"), Pushed::Text(String::new()));
        assert_eq!(s.finish(), "EN");
    }
}
