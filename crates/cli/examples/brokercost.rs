//! Temporary experiment: broker CPU per confirmed publish for message variants.
use gatehouse_broker::lapin::options::*;
use gatehouse_broker::lapin::types::{AMQPValue, FieldTable};
use gatehouse_broker::lapin::{BasicProperties, ExchangeKind};
use std::time::Instant;

fn beam_ticks() -> u64 {
    let pid = std::fs::read_to_string("/work/main/.gatehouse/rabbitmq/node.pid").unwrap();
    let s = std::fs::read_to_string(format!("/proc/{}/stat", pid.trim())).unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}
fn self_ticks() -> u64 {
    let s = std::fs::read_to_string("/proc/self/stat").unwrap();
    let f: Vec<&str> = s.rsplit(')').next().unwrap().split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let body_len: usize = std::env::var("BODY").ok().and_then(|v| v.parse().ok()).unwrap_or(120);
    let via_exchange = std::env::var("EXCH").is_ok();
    let qargs = std::env::var("QARGS").is_ok();
    let msgid = std::env::var("MSGID").is_ok();
    let c: usize = std::env::var("C").ok().and_then(|v| v.parse().ok()).unwrap_or(16);
    let n: u64 = 50_000;
    let conn = gatehouse_broker::connect("amqp://guest:guest@127.0.0.1:5672/%2f", "exp").await?;
    let ch = conn.create_channel().await?;
    let mut args = FieldTable::default();
    args.insert("x-max-priority".into(), AMQPValue::ShortShortUInt(9));
    args.insert("x-queue-version".into(), AMQPValue::ShortShortUInt(2));
    if qargs {
        args.insert("x-max-length".into(), AMQPValue::LongLongInt(1_000_000));
        args.insert("x-overflow".into(), AMQPValue::LongString("reject-publish".into()));
        args.insert("x-dead-letter-exchange".into(), AMQPValue::LongString("exp.dead".into()));
    }
    let q = "exp.q";
    let _ = ch.queue_delete(q.into(), QueueDeleteOptions::default()).await;
    ch.queue_declare(q.into(), QueueDeclareOptions { durable: true, ..Default::default() }, args).await?;
    ch.exchange_declare(
        "exp.x".into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions { durable: true, ..Default::default() },
        FieldTable::default(),
    )
    .await?;
    ch.queue_bind(
        q.into(),
        "exp.x".into(),
        "interactive".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    ch.confirm_select(ConfirmSelectOptions::default()).await?;
    let body = vec![b'x'; body_len];
    let budget = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(n));
    let (b0, s0, t0) = (beam_ticks(), self_ticks(), Instant::now());
    let mut tasks = vec![];
    for _ in 0..c {
        let (ch, body, budget) = (ch.clone(), body.clone(), budget.clone());
        tasks.push(tokio::spawn(async move {
            while budget.fetch_sub(1, std::sync::atomic::Ordering::Relaxed) as i64 > 0 {
                let mut props = BasicProperties::default().with_priority(5).with_delivery_mode(2);
                if msgid {
                    props = props.with_message_id("01JDQ7Z3Y8K2M4N6P8R0T2V4X6-abcdef".into());
                }
                let (ex, rk) = if via_exchange { ("exp.x", "interactive") } else { ("", q) };
                let opts = BasicPublishOptions { mandatory: true, ..Default::default() };
                let c =
                    ch.basic_publish(ex.into(), rk.into(), opts, &body, props).await.unwrap().await.unwrap();
                assert!(c.is_ack());
            }
        }));
    }
    for t in tasks {
        t.await?;
    }
    let el = t0.elapsed().as_secs_f64();
    let (b1, s1) = (beam_ticks(), self_ticks());
    println!(
        "body={body_len} exch={via_exchange} qargs={qargs} msgid={msgid} c={c}: {:.0}/s beam {:.1} us/msg client {:.1} us/msg",
        n as f64 / el,
        (b1 - b0) as f64 * 10_000.0 / n as f64,
        (s1 - s0) as f64 * 10_000.0 / n as f64
    );
    ch.queue_delete(q.into(), QueueDeleteOptions::default()).await?;
    Ok(())
}
