//! Dead letters: orders a stage gave up on after its retries, kept for operators.
//!
//! Table `dead_letters`: id (from 1, in the order they were given up on) → encoded `DeadLetter`. A
//! stage adds one in the same transaction as the event announcing the failure; `ListDeadLetters`
//! pages through them. What a stage can do with one (the notifier replays) is the stage's business.

use orderflow_proto::v1::{DeadLetter, ListDeadLettersRequest, ListDeadLettersResponse};
use prost::Message;
use redb::{ReadableTable, TableDefinition};
use tonic::Status;

use crate::{
    paging::{NumericPage, read_numeric_page},
    store::{Store, StoreError, Txn, decode_record},
};

const DEAD_LETTERS: TableDefinition<u64, &[u8]> = TableDefinition::new("dead_letters");
const DEAD_LETTERS_NAME: &str = "dead_letters";

/// Creates the table, so that listing a new store finds it empty.
pub fn create_table(txn: &mut Txn) -> Result<(), StoreError> {
    txn.redb().open_table(DEAD_LETTERS)?;
    Ok(())
}

/// Stores `letter` under the next id and returns it with that id.
pub fn add(txn: &mut Txn, mut letter: DeadLetter) -> Result<DeadLetter, StoreError> {
    let mut table = txn.redb().open_table(DEAD_LETTERS)?;
    letter.id = table.last()?.map_or(1, |(k, _)| k.value() + 1);
    table.insert(letter.id, letter.encode_to_vec().as_slice())?;
    Ok(letter)
}

/// Dead letter `id`, if there is one.
pub fn get(txn: &Txn, id: u64) -> Result<Option<DeadLetter>, StoreError> {
    let table = txn.redb().open_table(DEAD_LETTERS)?;
    let bytes = table.get(id)?.map(|v| v.value().to_vec());
    bytes
        .map(|bytes| decode_record(DEAD_LETTERS_NAME, id, &bytes))
        .transpose()
}

/// Rewrites dead letter `id` with `change` and returns it (`None` if there is no such id).
pub fn update(
    txn: &mut Txn,
    id: u64,
    change: impl FnOnce(&mut DeadLetter),
) -> Result<Option<DeadLetter>, StoreError> {
    let Some(mut letter) = get(txn, id)? else {
        return Ok(None);
    };
    change(&mut letter);
    txn.redb()
        .open_table(DEAD_LETTERS)?
        .insert(id, letter.encode_to_vec().as_slice())?;
    Ok(Some(letter))
}

/// The ids of every dead letter `keep` selects, in order.
pub fn ids_where(txn: &Txn, keep: impl Fn(&DeadLetter) -> bool) -> Result<Vec<u64>, StoreError> {
    let table = txn.redb().open_table(DEAD_LETTERS)?;
    let mut ids = Vec::new();
    for row in table.iter()? {
        let (id, bytes) = row?;
        let letter: DeadLetter = decode_record(DEAD_LETTERS_NAME, id.value(), bytes.value())?;
        if keep(&letter) {
            ids.push(id.value());
        }
    }
    Ok(ids)
}

/// A page of the dead letters of `store`'s partition by ascending id, each saying its partition,
/// and the id the next page starts at (`None` after the last).
pub async fn read_page(
    store: &Store,
    page: NumericPage,
) -> Result<(Vec<DeadLetter>, Option<u64>), Status> {
    let partition = store.partition().index;
    let (mut letters, next) = store
        .call(move |store| {
            store.read(|read| {
                read_numeric_page::<DeadLetter>(read, DEAD_LETTERS, DEAD_LETTERS_NAME, page)
            })
        })
        .await?;
    for letter in &mut letters {
        letter.partition = partition;
    }
    Ok((letters, crate::paging::next_start(&next)?))
}

/// `ListDeadLetters`: a page of dead letters by ascending id.
pub async fn list(
    store: &Store,
    request: ListDeadLettersRequest,
) -> Result<ListDeadLettersResponse, Status> {
    let page = NumericPage::parse(request.page_size, &request.page_token)?;
    store
        .call(move |store| {
            store.read(|read| {
                let (dead_letters, next_page_token) =
                    read_numeric_page(read, DEAD_LETTERS, DEAD_LETTERS_NAME, page)?;
                Ok::<_, StoreError>(ListDeadLettersResponse {
                    dead_letters,
                    next_page_token,
                })
            })
        })
        .await
}
