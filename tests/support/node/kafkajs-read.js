// Reads topics as a downstream Node team would: kafkajs 2.x, no codec plugins, a consumer group,
// read_committed (kafkajs's default isolation). One JSON line per record on stdout (key, value
// and header values base64, so bytes compare exactly); exits 0 once `expect` records arrived and
// `quietMs` passed without more (so duplicates show), 1 on a consumer error or at `timeoutMs`.
//
//   node kafkajs-read.js '{"brokers": ["127.0.0.1:9092"], "topics": ["a"], "expect": 10}'
"use strict";

const fs = require("fs");
const { Kafka, logLevel } = require("kafkajs");

const opts = Object.assign({ timeoutMs: 60000, quietMs: 2000, groupId: `kafkajs-${process.pid}` }, JSON.parse(process.argv[2]));
const b64 = (buf) => (buf == null ? null : Buffer.from(buf).toString("base64"));

const kafka = new Kafka({
  clientId: "interop-kafkajs",
  brokers: opts.brokers,
  logLevel: logLevel.ERROR,
  logCreator: () => ({ namespace, log }) => process.stderr.write(`kafkajs ${namespace}: ${log.message}\n`),
});
const consumer = kafka.consumer({ groupId: opts.groupId, readUncommitted: false, allowAutoTopicCreation: false });

let seen = 0;
let lastAt = Date.now();
let finished = false;

async function finish(code, why) {
  if (finished) return;
  finished = true;
  if (why) fs.writeSync(2, `${why}\n`);
  try {
    await consumer.disconnect();
  } finally {
    process.exit(code);
  }
}

consumer.on(consumer.events.CRASH, (e) => finish(1, `consumer crashed: ${e.payload.error && e.payload.error.message}`));

async function main() {
  await consumer.connect();
  await consumer.subscribe({ topics: opts.topics, fromBeginning: true });
  await consumer.run({
    autoCommit: false,
    eachMessage: async ({ topic, partition, message }) => {
      const headers = {};
      for (const [k, v] of Object.entries(message.headers || {})) {
        headers[k] = (Array.isArray(v) ? v : [v]).map(b64);
      }
      const line = { topic, partition, offset: message.offset, key: b64(message.key), value: b64(message.value), headers };
      fs.writeSync(1, JSON.stringify(line) + "\n"); // synchronous: process.exit drops what a pipe has not taken
      seen += 1;
      lastAt = Date.now();
    },
  });
  const started = Date.now();
  const timer = setInterval(() => {
    if (seen >= opts.expect && Date.now() - lastAt >= opts.quietMs) {
      clearInterval(timer);
      finish(0);
    } else if (Date.now() - started > opts.timeoutMs) {
      clearInterval(timer);
      finish(1, `timed out after ${opts.timeoutMs} ms with ${seen} of ${opts.expect} records`);
    }
  }, 100);
}

main().catch((e) => finish(1, `kafkajs failed: ${e.stack || e}`));
