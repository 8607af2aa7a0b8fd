//! `orderflow dlq list|replay`: orders a stage gave up on.

use clap::{Subcommand, ValueEnum};
use orderflow_proto::v1::{
    DeadLetter, ListDeadLettersRequest, ListDeadLettersResponse, ReplayDeadLettersRequest,
    invoice_creator_client::InvoiceCreatorClient, notifier_client::NotifierClient,
    replay_dead_letters_request::Target,
};

use tonic::Status;

use crate::client::{Connect, Stage, all_pages, refused};

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// Dead letters: undelivered notifications and failed payments
    List {
        /// Whose dead letters
        #[arg(long, value_enum, default_value_t = DlqStage::All)]
        stage: DlqStage,
    },
    /// Send notifier dead letters through delivery again (admin)
    Replay {
        /// One dead letter
        #[arg(long, conflicts_with = "all", required_unless_present = "all")]
        id: Option<u64>,
        /// Every dead letter still DEAD
        #[arg(long)]
        all: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DlqStage {
    All,
    /// Undelivered notifications (replayable)
    Notifier,
    /// Failed payments (a record; the stock was given back)
    Invoice,
}

pub async fn run(connect: &Connect, command: DlqCommand) -> anyhow::Result<()> {
    match command {
        DlqCommand::List { stage } => {
            let mut letters = Vec::new();
            if matches!(stage, DlqStage::All | DlqStage::Notifier) {
                let client = NotifierClient::new(connect.channel(Stage::Notifier).await?);
                letters.extend(
                    all_dead_letters(|request| {
                        let mut client = client.clone();
                        async move { client.list_dead_letters(request).await }
                    })
                    .await?,
                );
            }
            if matches!(stage, DlqStage::All | DlqStage::Invoice) {
                let client = InvoiceCreatorClient::new(connect.channel(Stage::Invoice).await?);
                letters.extend(
                    all_dead_letters(|request| {
                        let mut client = client.clone();
                        async move { client.list_dead_letters(request).await }
                    })
                    .await?,
                );
            }
            print_letters(&letters);
        }
        DlqCommand::Replay { id, all } => {
            let target = match id {
                Some(id) => Target::Id(id),
                None => Target::All(all),
            };
            let mut client = NotifierClient::new(connect.channel(Stage::Notifier).await?);
            let request = connect.admin(ReplayDeadLettersRequest {
                target: Some(target),
            })?;
            let response = match client.replay_dead_letters(request).await {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    let Some(id) = id else {
                        return Err(refused("ReplayDeadLetters", status));
                    };
                    return Err(not_replayable(connect, id, status).await);
                }
                Err(status) => return Err(refused("ReplayDeadLetters", status)),
            };
            println!(
                "replayed {} dead letter(s): {:?}",
                response.replayed.len(),
                response.replayed
            );
            if !response.skipped.is_empty() {
                println!(
                    "skipped {} (already delivered or being replayed): {:?}",
                    response.skipped.len(),
                    response.skipped
                );
            }
        }
    }
    Ok(())
}

/// Why `id` could not be replayed: the notifier has no such dead letter, and if the invoice stage
/// has one by that id, that it records a failed payment, which nothing can replay.
async fn not_replayable(connect: &Connect, id: u64, status: Status) -> anyhow::Error {
    let invoice_letter = async {
        let mut client = InvoiceCreatorClient::new(connect.channel(Stage::Invoice).await.ok()?);
        let page = client
            .list_dead_letters(ListDeadLettersRequest {
                page_size: 1,
                page_token: id.to_string(),
            })
            .await
            .ok()?
            .into_inner();
        page.dead_letters.into_iter().find(|l| l.id == id)
    }
    .await;
    match invoice_letter {
        Some(letter) => anyhow::anyhow!(
            "dead letter {id} is the invoice stage's: the payment of order {} failed ({}: {}); its \
             stock was given back and the customer was told, so there is nothing to replay.\n  \
             Only the notifier's dead letters (undelivered notifications) can be replayed: \
             `orderflow dlq list --stage notifier`",
            letter.order_id,
            letter.reason,
            letter.last_error
        ),
        None => refused("ReplayDeadLetters", status),
    }
}

/// Every page of one stage's `ListDeadLetters`; `list` makes one call.
async fn all_dead_letters<F, Fut>(list: F) -> anyhow::Result<Vec<DeadLetter>>
where
    F: Fn(ListDeadLettersRequest) -> Fut,
    Fut: std::future::Future<Output = Result<tonic::Response<ListDeadLettersResponse>, Status>>,
{
    all_pages("ListDeadLetters", |page_token| {
        let call = list(ListDeadLettersRequest {
            page_size: 1000,
            page_token,
        });
        async move {
            let page = call.await?.into_inner();
            Ok((page.dead_letters, page.next_page_token))
        }
    })
    .await
}

fn print_letters(letters: &[DeadLetter]) {
    println!(
        "{:<6} {:<9} {:<38} {:<20} {:>8} {:<10} LAST ERROR",
        "ID", "STAGE", "ORDER", "REASON", "ATTEMPTS", "STATE"
    );
    for l in letters {
        println!(
            "{:<6} {:<9} {:<38} {:<20} {:>8} {:<10} {}",
            l.id,
            l.stage,
            l.order_id,
            l.reason,
            l.attempts,
            l.state()
                .as_str_name()
                .strip_prefix("DEAD_LETTER_STATE_")
                .unwrap_or("?"),
            l.last_error
        );
    }
    println!("{} dead letter(s)", letters.len());
    if letters.iter().any(|l| l.stage != "notifier") {
        println!(
            "(invoice dead letters record failed payments; only notifier dead letters can be replayed)"
        );
    }
}
