//! Running a `search` over the shards' indexes: the query built from the parsed terms
//! (never from a query language the client could use to reach other fields), restricted
//! to the conversations the user is a member of, per index; the hits of all indexes
//! merged by score, then paged.
//!
//! Scores are BM25 within each shard's index, whose term statistics are its own: merging
//! them across shards is approximate, as in any index partitioned without global
//! statistics. Equal scores keep each index's order (the order messages were indexed).

use std::ops::Bound;

use parley_router::ownership::conversation_home;
use parley_router::search::{next_cursor, SearchRequest, Term as QueryTerm};
use serde::Serialize;
use tantivy::collector::TopDocs;
use tantivy::query::{
    BooleanQuery, Occur, PhrasePrefixQuery, PhraseQuery, Query, RangeQuery, TermQuery, TermSetQuery,
};
use tantivy::schema::{IndexRecordOption, Value};
use tantivy::snippet::SnippetGenerator;
use tantivy::{DocAddress, Score, Searcher, TantivyDocument, Term};

use super::index::{Fields, ShardIndex};
use super::tokenizer::analyzer;

/// Words a prefix expands to at most, per index.
const PREFIX_EXPANSIONS: u32 = 64;
/// Characters of a snippet at most.
const SNIPPET_CHARS: usize = 160;

#[derive(Debug, Serialize, PartialEq)]
pub struct Hit {
    pub conv: String,
    pub seq: u64,
    pub from: String,
    pub ts: u64,
    pub kind: String,
    /// The matching fragment as HTML: its text escaped, each match in `<b>…</b>`.
    pub snippet: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Answer {
    pub hits: Vec<Hit>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next: Option<String>,
}

/// Run `request` over `indexes` (one per shard, `None` for one not open yet).
pub fn run(
    request: &SearchRequest,
    indexes: &[Option<&ShardIndex>],
    max_results: usize,
) -> tantivy::Result<Answer> {
    let query = &request.query;
    let shards = indexes.len() as u32;
    let wanted = query.offset + query.limit;
    let mut found: Vec<Candidate> = Vec::new();
    let mut searched: Vec<Option<Searched>> = Vec::new();
    for (shard, index) in indexes.iter().enumerate() {
        let convs: Vec<&str> = request
            .convs
            .iter()
            .map(String::as_str)
            .filter(|conv| conversation_home(conv, shards) as usize == shard)
            .collect();
        let (Some(index), false) = (index, convs.is_empty()) else {
            searched.push(None);
            continue;
        };
        let Some(built) = build(request, index.fields, &convs) else {
            // Every term folded to nothing: nothing can match.
            return Ok(Answer {
                hits: Vec::new(),
                next: None,
            });
        };
        let searcher = index.reader.searcher();
        // One more than the page, to know whether another page exists.
        let top = searcher.search(&built, &TopDocs::with_limit(wanted + 1).order_by_score())?;
        found.extend(top.into_iter().map(|(score, address)| Candidate {
            shard,
            score,
            address,
        }));
        searched.push(Some(Searched {
            searcher,
            query: built,
            fields: index.fields,
            snippets: None,
        }));
    }
    // Each index's hits come best first, equal scores in index order (tantivy's order):
    // merged the same way, a page is always a prefix of the next page's `wanted`.
    found.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(a.shard.cmp(&b.shard))
            .then(a.address.cmp(&b.address))
    });
    let more = found.len() > wanted && wanted < max_results;
    let mut hits = Vec::with_capacity(query.limit);
    // Only the page's documents are read from the store.
    for candidate in found.into_iter().skip(query.offset).take(query.limit) {
        if let Some(Some(shard)) = searched.get_mut(candidate.shard) {
            hits.push(shard.hit(candidate.address)?);
        }
    }
    Ok(Answer {
        hits,
        next: more.then(|| next_cursor(query)),
    })
}

struct Candidate {
    shard: usize,
    score: Score,
    address: DocAddress,
}

/// One index searched: what reading its hits needs.
struct Searched {
    searcher: Searcher,
    query: Box<dyn Query>,
    fields: Fields,
    /// Made for the first hit that needs it (it looks up the query's terms once).
    snippets: Option<SnippetGenerator>,
}

impl Searched {
    fn hit(&mut self, address: DocAddress) -> tantivy::Result<Hit> {
        let doc: TantivyDocument = self.searcher.doc(address)?;
        let f = self.fields;
        let text = |field| doc.get_first(field).and_then(|v| v.as_str()).unwrap_or("");
        let number = |field| doc.get_first(field).and_then(|v| v.as_u64()).unwrap_or(0);
        let snippets = match &mut self.snippets {
            Some(generator) => generator,
            empty => {
                let mut generator =
                    SnippetGenerator::create(&self.searcher, self.query.as_ref(), f.body)?;
                generator.set_max_num_chars(SNIPPET_CHARS);
                empty.insert(generator)
            }
        };
        Ok(Hit {
            conv: text(f.conv).to_string(),
            seq: number(f.seq),
            from: text(f.from).to_string(),
            ts: number(f.ts),
            kind: text(f.kind).to_string(),
            snippet: snippet(snippets, text(f.body)),
        })
    }
}

/// The index's tokens of `text`, as terms of the body field.
fn body_terms(fields: Fields, text: &str) -> Vec<Term> {
    let mut analyzer = analyzer();
    let mut stream = analyzer.token_stream(text);
    let mut terms = Vec::new();
    while let Some(token) = stream.next() {
        terms.push(Term::from_field_text(fields.body, &token.text));
    }
    terms
}

/// The query for one index: every term must match, within `convs`, and the filters.
/// `None` when a word, phrase or prefix has no indexable token at all.
fn build(request: &SearchRequest, fields: Fields, convs: &[&str]) -> Option<Box<dyn Query>> {
    let query = &request.query;
    let mut clauses: Vec<(Occur, Box<dyn Query>)> = Vec::new();
    for term in &query.terms {
        let (text, prefix) = match term {
            QueryTerm::Word(text) | QueryTerm::Phrase(text) => (text, false),
            QueryTerm::Prefix(text) => (text, true),
        };
        let mut terms = body_terms(fields, text);
        let clause: Box<dyn Query> = match (terms.len(), prefix) {
            (0, _) => return None,
            (1, false) => Box::new(TermQuery::new(
                terms.remove(0),
                IndexRecordOption::WithFreqs,
            )),
            (_, false) => Box::new(PhraseQuery::new(terms)),
            (_, true) => {
                let mut phrase = PhrasePrefixQuery::new(terms);
                phrase.set_max_expansions(PREFIX_EXPANSIONS);
                Box::new(phrase)
            }
        };
        clauses.push((Occur::Must, clause));
    }
    let convs = convs
        .iter()
        .map(|conv| Term::from_field_text(fields.conv, conv));
    clauses.push((Occur::Must, Box::new(TermSetQuery::new(convs))));
    if let Some(from) = &query.from {
        let term = Term::from_field_text(fields.from, from);
        clauses.push((
            Occur::Must,
            Box::new(TermQuery::new(term, IndexRecordOption::Basic)),
        ));
    }
    if query.after_ts.is_some() || query.before_ts.is_some() {
        let bound = |ts: Option<u64>| match ts {
            Some(ts) => Bound::Excluded(Term::from_field_u64(fields.ts, ts)),
            None => Bound::Unbounded,
        };
        let range = RangeQuery::new(bound(query.after_ts), bound(query.before_ts));
        clauses.push((Occur::Must, Box::new(range)));
    }
    Some(Box::new(BooleanQuery::new(clauses)))
}

/// The fragment of `text` that best matches, marked; the text's start when the
/// generator finds no match (a prefix's expansions are not among its terms).
fn snippet(generator: &SnippetGenerator, text: &str) -> String {
    let snippet = generator.snippet(text);
    if !snippet.fragment().is_empty() {
        return snippet.to_html();
    }
    let start: String = text.chars().take(SNIPPET_CHARS).collect();
    htmlescape::encode_minimal(&start)
}
