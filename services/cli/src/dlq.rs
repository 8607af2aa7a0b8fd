//! `orderflow dlq list|replay`: orders a stage gave up on.

use clap::{Subcommand, ValueEnum};
use orderflow_proto::v1::{
    DeadLetter, DeadLetterKey, ListDeadLettersRequest, ListDeadLettersResponse,
    ReplayDeadLettersRequest, invoice_creator_client::InvoiceCreatorClient,
    notifier_client::NotifierClient, replay_dead_letters_request::Target,
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
        /// Every dead letter still DEAD, in every partition
        #[arg(long)]
        all: bool,
        /// The partition of the dead letter `--id` (the PART column of `dlq list`)
        #[arg(long, default_value_t = 0, conflicts_with = "all")]
        partition: u32,
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
        DlqCommand::Replay { id, all, partition } => {
            let target = match id {
                Some(id) => Target::Id(id),
                None => Target::All(all),
            };
            let mut client = NotifierClient::new(connect.channel(Stage::Notifier).await?);
            let request = connect.admin(ReplayDeadLettersRequest {
                target: Some(target),
                partition,
            })?;
            let response = match client.replay_dead_letters(request).await {
                Ok(response) => response.into_inner(),
                Err(status) if status.code() == tonic::Code::NotFound => {
                    let Some(id) = id else {
                        return Err(refused("ReplayDeadLetters", status));
                    };
                    return Err(not_replayable(connect, partition, id, status).await);
                }
                Err(status) => return Err(refused("ReplayDeadLetters", status)),
            };
            println!(
                "replayed {} dead letter(s): {}",
                response.replayed_letters.len(),
                keys(&response.replayed_letters)
            );
            if !response.skipped_letters.is_empty() {
                println!(
                    "skipped {} (already delivered or being replayed): {}",
                    response.skipped_letters.len(),
                    keys(&response.skipped_letters)
                );
            }
        }
    }
    Ok(())
}

/// Dead letters by id, as `[1, 2]`, or with their partitions, `[0/1, 2/7]`, when any is not
/// partition 0's.
fn keys(letters: &[DeadLetterKey]) -> String {
    let partitioned = letters.iter().any(|key| key.partition > 0);
    let keys: Vec<String> = letters
        .iter()
        .map(|key| match partitioned {
            true => format!("{}/{}", key.partition, key.id),
            false => key.id.to_string(),
        })
        .collect();
    format!("[{}]", keys.join(", "))
}

/// Why `id` of `partition` could not be replayed: the notifier has no such dead letter, and if the
/// invoice stage has one by that id, that it records a failed payment, which nothing can replay.
async fn not_replayable(
    connect: &Connect,
    partition: u32,
    id: u64,
    status: Status,
) -> anyhow::Error {
    let invoice_letter = async {
        let client = InvoiceCreatorClient::new(connect.channel(Stage::Invoice).await.ok()?);
        let letters = all_dead_letters(|request| {
            let mut client = client.clone();
            async move { client.list_dead_letters(request).await }
        })
        .await
        .ok()?;
        letters
            .into_iter()
            .find(|l| l.id == id && l.partition == partition)
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
        "{:<6} {:<4} {:<9} {:<38} {:<20} {:>8} {:<10} LAST ERROR",
        "ID", "PART", "STAGE", "ORDER", "REASON", "ATTEMPTS", "STATE"
    );
    for l in letters {
        println!(
            "{:<6} {:<4} {:<9} {:<38} {:<20} {:>8} {:<10} {}",
            l.id,
            l.partition,
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
