//! `GetInvoice`, and the pages of `ListInvoices` in one partition.

use orderflow_proto::v1::{GetInvoiceRequest, Invoice};
use orderflow_runtime::{FieldViolations, NumericPage, Store, StoreError, decode_record, paging};
use tonic::Status;

use crate::tables::{BY_ORDER, INVOICES, INVOICES_NAME};

/// Checks the fields of a `GetInvoice` request.
pub(crate) fn check(request: &GetInvoiceRequest) -> Result<(), Status> {
    let mut violations = FieldViolations::new();
    violations.check_identifier(
        "order_id",
        &request.order_id,
        orderflow_runtime::status::MAX_ORDER_ID_CHARS,
    );
    violations.check()
}

/// The invoice of an order whose partition `store` holds (a valid request, [`check`]).
pub(crate) async fn get_invoice(
    store: &Store,
    request: GetInvoiceRequest,
) -> Result<Invoice, Status> {
    let order_id = request.order_id.clone();
    let invoice = store
        .call(move |store| {
            store.read(|read| {
                let Some(number) = read.open_table(BY_ORDER)?.get(order_id.as_str())? else {
                    return Ok(None);
                };
                let number = number.value();
                match read.open_table(INVOICES)?.get(number)? {
                    Some(bytes) => decode_record(INVOICES_NAME, number, bytes.value()).map(Some),
                    None => Ok::<_, StoreError>(None),
                }
            })
        })
        .await?;
    invoice.ok_or_else(|| not_found(&request.order_id))
}

/// No invoice for `order_id`.
pub(crate) fn not_found(order_id: &str) -> Status {
    Status::not_found(format!(
        "no invoice for order {order_id} (unknown, rejected, payment failed or not paid yet)"
    ))
}

/// A page of the invoices of `store`'s partition by number, and the number the next page starts
/// at (`None` after the last).
pub(crate) async fn read_invoices(
    store: &Store,
    page: NumericPage,
) -> Result<(Vec<Invoice>, Option<u64>), Status> {
    let (invoices, next) = store
        .call(move |store| {
            store.read(|read| paging::read_numeric_page(read, INVOICES, INVOICES_NAME, page))
        })
        .await?;
    Ok((invoices, paging::next_start(&next)?))
}
