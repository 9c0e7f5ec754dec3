//! The search tokenizer: words fold case and accents in every script, and scripts written
//! without spaces between words are indexed a character at a time.
//!
//! - A word is a run of letters, digits and combining marks. Its indexed form is its
//!   compatibility decomposition (NFKD: `ﬁ` is `fi`, full-width `Ａ` is `A`) without the
//!   combining marks (`é` is `e`, Greek `ά` is `α`), lowercased; tantivy's ASCII folding
//!   filter then takes the Latin letters NFKD leaves alone (`ø`, `ß`, `æ`, `ł`).
//! - Han, kana, Thai, Lao, Khmer and Myanmar have no spaces between words, and choosing
//!   word boundaries needs a dictionary per language. Each of their characters is a token
//!   of its own instead; a query word of several such characters becomes a phrase (the
//!   query builder does that for any word that yields several tokens), so `東京` finds
//!   exactly the text `東京`. Hangul is written with spaces and is tokenized as words.
//! - Offsets are the original text's, so snippets mark the text as written.

use tantivy::tokenizer::{
    AsciiFoldingFilter, RemoveLongFilter, TextAnalyzer, Token, TokenStream, Tokenizer,
};
use unicode_normalization::char::is_combining_mark;
use unicode_normalization::UnicodeNormalization;

/// The name the index registers the analyzer under (stored in the index's schema).
pub const TOKENIZER_NAME: &str = "parley_fold";

/// Tokens longer than this (in bytes, folded) are not indexed: a run of 100 letters is
/// not a word anyone searches for, and tantivy bounds a term's length anyway.
const MAX_TOKEN_BYTES: usize = 100;

/// The analyzer the index and the query builder both use.
pub fn analyzer() -> TextAnalyzer {
    TextAnalyzer::builder(FoldingTokenizer)
        .filter(AsciiFoldingFilter)
        .filter(RemoveLongFilter::limit(MAX_TOKEN_BYTES))
        .build()
}

#[derive(Clone, Default)]
pub struct FoldingTokenizer;

pub struct FoldingTokenStream {
    tokens: Vec<Token>,
    next: usize,
}

/// Characters of scripts written without spaces between words.
fn unspaced(c: char) -> bool {
    matches!(c as u32,
        0x0E00..=0x0EFF // Thai, Lao
        | 0x1000..=0x109F // Myanmar
        | 0x1780..=0x17FF // Khmer
        | 0x2E80..=0x2FDF // CJK radicals
        | 0x3005..=0x3007 // ideographic marks and zero
        | 0x3040..=0x30FF // Hiragana, Katakana
        | 0x3100..=0x312F // Bopomofo
        | 0x31A0..=0x31FF // Bopomofo extended, Katakana extensions
        | 0x3400..=0x4DBF // CJK extension A
        | 0x4E00..=0x9FFF // CJK unified ideographs
        | 0xF900..=0xFAFF // CJK compatibility ideographs
        | 0xFF66..=0xFF9F // half-width Katakana
        | 0x20000..=0x3134F // CJK extensions B-G
    )
}

fn word_char(c: char) -> bool {
    c.is_alphanumeric() || is_combining_mark(c)
}

/// A token's indexed form: NFKD, no combining marks, composed again (Hangul syllables
/// stay syllables), lowercase. A mark with no letter before it folds to nothing.
fn fold(text: &str) -> String {
    text.nfkd()
        .filter(|c| !is_combining_mark(*c))
        .nfc()
        .flat_map(char::to_lowercase)
        .collect()
}

impl Tokenizer for FoldingTokenizer {
    type TokenStream<'a> = FoldingTokenStream;

    fn token_stream<'a>(&'a mut self, text: &'a str) -> FoldingTokenStream {
        let mut tokens = Vec::new();
        let mut chars = text.char_indices().peekable();
        while let Some((start, c)) = chars.next() {
            if !word_char(c) {
                continue;
            }
            let mut end = start + c.len_utf8();
            if unspaced(c) {
                // One character, with the marks that belong to it.
                while let Some(&(at, mark)) = chars.peek() {
                    if !is_combining_mark(mark) || unspaced(mark) {
                        break;
                    }
                    end = at + mark.len_utf8();
                    chars.next();
                }
            } else {
                while let Some(&(at, next)) = chars.peek() {
                    if !word_char(next) || unspaced(next) {
                        break;
                    }
                    end = at + next.len_utf8();
                    chars.next();
                }
            }
            let folded = fold(&text[start..end]);
            if folded.is_empty() {
                continue;
            }
            tokens.push(Token {
                offset_from: start,
                offset_to: end,
                position: tokens.len(),
                text: folded,
                position_length: 1,
            });
        }
        FoldingTokenStream { tokens, next: 0 }
    }
}

impl TokenStream for FoldingTokenStream {
    fn advance(&mut self) -> bool {
        self.next += 1;
        self.next <= self.tokens.len()
    }

    fn token(&self) -> &Token {
        &self.tokens[self.next - 1]
    }

    fn token_mut(&mut self) -> &mut Token {
        &mut self.tokens[self.next - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens(text: &str) -> Vec<String> {
        let mut analyzer = analyzer();
        let mut stream = analyzer.token_stream(text);
        let mut out = Vec::new();
        while let Some(token) = stream.next() {
            out.push(token.text.clone());
        }
        out
    }

    #[test]
    fn case_and_accents_fold_in_every_script() {
        assert_eq!(tokens("Crème BRÛLÉE, naïve"), ["creme", "brulee", "naive"]);
        // Decomposed input (e + combining acute) folds the same as composed.
        assert_eq!(tokens("cafe\u{301}"), tokens("café"));
        assert_eq!(tokens("Straße Øresund"), ["strasse", "oresund"]);
        assert_eq!(tokens("Ἀθῆναι ΆΘΗΝΑ"), ["αθηναι", "αθηνα"]);
        assert_eq!(tokens("Москва́ ёлка"), ["москва", "елка"]);
        assert_eq!(tokens("ﬁnal ＡＢＣ"), ["final", "abc"]);
    }

    #[test]
    fn unspaced_scripts_are_single_characters() {
        assert_eq!(tokens("東京タワー"), ["東", "京", "タ", "ワ", "ー"]);
        assert_eq!(tokens("hello世界"), ["hello", "世", "界"]);
        // Hangul has spaces between words: words.
        assert_eq!(tokens("안녕 세상"), ["안녕", "세상"]);
    }

    #[test]
    fn offsets_are_the_original_texts() {
        let text = "Un café, s'il vous plaît";
        let mut analyzer = analyzer();
        let mut stream = analyzer.token_stream(text);
        let mut spans = Vec::new();
        while let Some(token) = stream.next() {
            spans.push(&text[token.offset_from..token.offset_to]);
        }
        assert_eq!(spans, ["Un", "café", "s", "il", "vous", "plaît"]);
    }
}
