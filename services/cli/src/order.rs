//! `orderflow get` and `orderflow watch`: where an order is, once or live.

use orderflow_proto::v1::{
    GetOrderRequest, Order, OrderStatus, OrderTransition, WatchOrderRequest,
    order_receiver_client::OrderReceiverClient,
};

use crate::client::{Connect, Stage, refused};

/// Prints the order and its progress (as JSON with `json`).
pub async fn get(connect: &Connect, order_id: String, json: bool) -> anyhow::Result<()> {
    let mut client = OrderReceiverClient::new(connect.channel(Stage::Receiver).await?);
    let order = client
        .get_order(GetOrderRequest { order_id })
        .await
        .map_err(|status| refused("GetOrder", status))?
        .into_inner()
        .order
        .unwrap_or_default();
    if json {
        println!("{:#}", orderflow_receiver::order_json(&order));
    } else {
        print!("{}", describe(&order));
    }
    Ok(())
}

/// Follows the order until it is terminal, one line per transition.
pub async fn watch(connect: &Connect, order_id: String) -> anyhow::Result<()> {
    let mut client = OrderReceiverClient::new(connect.channel(Stage::Receiver).await?);
    let mut stream = client
        .watch_order(WatchOrderRequest { order_id })
        .await
        .map_err(|status| refused("WatchOrder", status))?
        .into_inner();
    // The stages' logs are read independently, so a state can be learned after a later one (a
    // payment failure after the notification about it) and then sits before it in the order's
    // list: print each state once, as it is learned, rather than "whatever follows what was
    // printed".
    let mut shown: Vec<i32> = Vec::new();
    let mut last = None;
    while let Some(order) = stream
        .message()
        .await
        .map_err(|status| refused("WatchOrder", status))?
    {
        if last.is_none() {
            println!("order {}  customer {}", order.order_id, order.customer_id);
        }
        for transition in newly_learned(&order, &mut shown) {
            println!(
                "  {}  {:<14} {}",
                time(transition.at.as_ref()),
                short(transition.status()),
                transition.stage
            );
        }
        last = Some(order);
    }
    if let Some(order) = last {
        print!("{}", details(&order));
    }
    Ok(())
}

/// The order's transitions whose state is not in `shown` yet, in the order's order; adds them.
fn newly_learned<'a>(order: &'a Order, shown: &mut Vec<i32>) -> Vec<&'a OrderTransition> {
    let mut new = Vec::new();
    for transition in &order.transitions {
        if !shown.contains(&transition.status) {
            shown.push(transition.status);
            new.push(transition);
        }
    }
    new
}

fn short(status: OrderStatus) -> &'static str {
    status
        .as_str_name()
        .strip_prefix("ORDER_STATUS_")
        .unwrap_or("UNSPECIFIED")
}

fn time(ts: Option<&prost_types::Timestamp>) -> String {
    ts.and_then(|ts| std::time::SystemTime::try_from(*ts).ok())
        .map_or_else(
            || "-".into(),
            |t| humantime::format_rfc3339_millis(t).to_string(),
        )
}

fn describe(order: &Order) -> String {
    let path: Vec<_> = order
        .transitions
        .iter()
        .map(|t| short(t.status()))
        .collect();
    let mut out = format!(
        "order     {}\ncustomer  {}\nstatus    {}{}\npath      {}\nplaced    {}\nlines     {}\n",
        order.order_id,
        order.customer_id,
        short(order.status()),
        if order.terminal { " (terminal)" } else { "" },
        path.join(" → "),
        time(order.placed_at.as_ref()),
        order
            .lines
            .iter()
            .map(|l| format!("{}×{}", l.sku, l.quantity))
            .collect::<Vec<_>>()
            .join(", "),
    );
    for transition in &order.transitions {
        out.push_str(&format!(
            "          {:<14} {:<9} {}\n",
            short(transition.status()),
            transition.stage,
            time(transition.at.as_ref())
        ));
    }
    out.push_str(&details(order));
    out
}

fn details(order: &Order) -> String {
    let mut out = String::new();
    if let Some(invoice) = &order.invoice {
        let money = |m: &Option<orderflow_proto::v1::Money>| {
            m.as_ref().map_or_else(String::new, ToString::to_string)
        };
        out.push_str(&format!(
            "invoice   #{}  total {} (tax {}), {} payment attempt(s)\n",
            invoice.number,
            money(&invoice.total),
            money(&invoice.tax),
            invoice.payment_attempts
        ));
    }
    for rejection in &order.rejections {
        out.push_str(&format!(
            "rejected  {}\n",
            orderflow_notifier::describe_rejection(rejection)
        ));
    }
    if !order.failure_reason.is_empty() {
        out.push_str(&format!("failure   {}\n", order.failure_reason));
    }
    if order.stock_released_at.is_some() {
        out.push_str(&format!(
            "released  {}\n",
            time(order.stock_released_at.as_ref())
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(path: &[OrderStatus]) -> Order {
        Order {
            transitions: path
                .iter()
                .map(|status| OrderTransition {
                    status: (*status).into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_state_learned_late_is_printed_once_when_it_is_learned() {
        use OrderStatus::{Accepted, Notified, PaymentFailed, Reserved};
        let mut shown = Vec::new();
        let statuses = |new: Vec<&OrderTransition>| -> Vec<OrderStatus> {
            new.iter().map(|t| t.status()).collect()
        };
        let first = order(&[Accepted, Reserved, Notified]);
        assert_eq!(
            statuses(newly_learned(&first, &mut shown)),
            [Accepted, Reserved, Notified]
        );
        // The invoice stage's verdict arrives after the notifier's and sorts before it.
        let then = order(&[Accepted, Reserved, PaymentFailed, Notified]);
        assert_eq!(statuses(newly_learned(&then, &mut shown)), [PaymentFailed]);
        assert!(newly_learned(&then, &mut shown).is_empty());
    }
}
