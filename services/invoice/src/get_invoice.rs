//! `GetInvoice`, `ListInvoices` and `ListDeadLetters`.

use orderflow_proto::v1::{
    GetInvoiceRequest, Invoice, ListDeadLettersRequest, ListDeadLettersResponse,
    ListInvoicesRequest, ListInvoicesResponse,
};
use orderflow_runtime::{
    FieldViolations, NumericPage, Store, StoreError, dead_letters, decode_record, paging,
};
use tonic::Status;

use crate::tables::{BY_ORDER, INVOICES, INVOICES_NAME};

pub(crate) async fn get_invoice(
    store: &Store,
    request: GetInvoiceRequest,
) -> Result<Invoice, Status> {
    let mut violations = FieldViolations::new();
    violations.check_identifier(
        "order_id",
        &request.order_id,
        orderflow_runtime::status::MAX_ORDER_ID_CHARS,
    );
    violations.check()?;
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
    invoice.ok_or_else(|| {
        Status::not_found(format!(
            "no invoice for order {} (unknown, rejected, payment failed or not paid yet)",
            request.order_id
        ))
    })
}

pub(crate) async fn list_invoices(
    store: &Store,
    request: ListInvoicesRequest,
) -> Result<ListInvoicesResponse, Status> {
    let page = NumericPage::parse(request.page_size, &request.page_token)?;
    store
        .call(move |store| {
            store.read(|read| {
                let (invoices, next_page_token) =
                    paging::read_numeric_page(read, INVOICES, INVOICES_NAME, page)?;
                Ok::<_, StoreError>(ListInvoicesResponse {
                    invoices,
                    next_page_token,
                })
            })
        })
        .await
}

pub(crate) async fn list_dead_letters(
    store: &Store,
    request: ListDeadLettersRequest,
) -> Result<ListDeadLettersResponse, Status> {
    dead_letters::list(store, request).await
}
