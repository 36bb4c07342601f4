//! The memory of an answer while it is built (both engines): the rows read and the text
//! rendered from them are reserved as they grow, in the answer budget the HTTP layer hands in
//! (`api::answers`), before the memory is taken. When the next step is refused the build keeps
//! no more rows: the rest is read past and dropped (the statement runs to its end, the
//! connection stays clean), and the caller answers 429 or, for a role that may have written,
//! the answer without its rows.

/// Where an answer being built reserves its memory: asked for the bytes the build holds in all
/// (rows and text), it answers what it covers now (at least that, so that it is asked again
/// only past it) or `None` once refused. The wire client's own trait, so that PostgreSQL's
/// rows are reserved as they are read.
pub use fluxbase_replication::wire::ResultMemory as AnswerMemory;

/// Text growth at least this much at a time (the first growth of a small answer aside).
const MIN_GROWTH: usize = 16 * 1024;

/// The text of an answer being built, grown only by what its memory covered first: by a
/// quarter of its size at a time (and never past `max`, the largest the answer can be), so
/// that the text and the rows it is rendered from (`others`, dropped as they are rendered)
/// hold at most about 1.25 × the answer together.
pub struct AnswerText<'m> {
    pub out: String,
    /// Bytes the build holds besides the text (rows not rendered yet, a row's scratch).
    pub others: usize,
    memory: &'m dyn AnswerMemory,
    covered: usize,
    max: usize,
    refused: bool,
}

impl<'m> AnswerText<'m> {
    /// An empty text of `capacity` (if covered: else none) that should not need to grow past
    /// `max` bytes, with `others` held besides it.
    pub fn new(
        memory: &'m dyn AnswerMemory,
        capacity: usize,
        max: usize,
        others: usize,
    ) -> AnswerText<'m> {
        let mut text = AnswerText {
            out: String::new(),
            others,
            memory,
            covered: 0,
            max,
            refused: false,
        };
        if text.covers(others + capacity) {
            text.out.reserve_exact(capacity);
        }
        text
    }

    /// Whether the memory refused a step: the build keeps no more rows.
    pub fn refused(&self) -> bool {
        self.refused
    }

    /// Room for `more` bytes of text, covered first; `false`: refused.
    pub fn reserve(&mut self, more: usize) -> bool {
        let need = self.out.len() + more;
        let capacity = self.out.capacity();
        if need <= capacity {
            return true;
        }
        let grown = need
            .max(capacity + capacity / 4)
            .max(capacity + MIN_GROWTH)
            .min(self.max.max(need));
        if !self.covers(self.others + grown) {
            return false;
        }
        self.out.reserve_exact(grown - self.out.len());
        true
    }

    /// After writing: what the text and the rest hold now is covered (a value whose escapes
    /// made it longer than foreseen may have grown the text by itself); `false`: refused.
    pub fn check(&mut self) -> bool {
        self.covers(self.others + self.out.capacity())
    }

    fn covers(&mut self, bytes: usize) -> bool {
        if self.refused {
            return false;
        }
        if bytes <= self.covered {
            return true;
        }
        match self.memory.cover(bytes) {
            Some(covered) => {
                self.covered = covered;
                true
            }
            None => {
                self.refused = true;
                false
            }
        }
    }

    /// The text, for the rest of the answer (the envelope after the rows, small).
    pub fn into_string(self) -> String {
        self.out
    }
}

/// Memory without a bound: the domain's unit tests.
#[cfg(test)]
pub struct Unbounded;

#[cfg(test)]
impl AnswerMemory for Unbounded {
    fn cover(&self, _bytes: usize) -> Option<usize> {
        Some(usize::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Covers up to `limit`, recording what it was asked.
    struct Upto {
        limit: usize,
        asked: Mutex<Vec<usize>>,
    }

    impl AnswerMemory for Upto {
        fn cover(&self, bytes: usize) -> Option<usize> {
            self.asked.lock().unwrap().push(bytes);
            (bytes <= self.limit).then_some(bytes)
        }
    }

    #[test]
    fn the_text_grows_by_a_quarter_within_what_was_covered_and_stops_when_refused() {
        let memory = Upto {
            limit: 1 << 20,
            asked: Mutex::default(),
        };
        let mut text = AnswerText::new(&memory, 1000, 900_000, 100_000);
        assert!(text.out.capacity() >= 1000);
        while text.reserve(10_000) {
            text.out.push_str(&"x".repeat(10_000));
            assert!(text.check());
            assert!(text.out.capacity() + text.others <= 1 << 20);
        }
        assert!(text.refused());
        assert!(!text.reserve(1), "refused for good");
        let asked = memory.asked.lock().unwrap();
        assert!(asked.iter().all(|&a| a <= (1 << 20) + 200_000), "{asked:?}");
        // Fewer asks than pushes: the text grows in steps.
        assert!(asked.len() < text.out.len() / 10_000, "{}", asked.len());
    }
}
