/**
 * kill -9 of the sender, then of the agent, at seeded random points: running the same send again
 * continues from what the agent committed, the result compares identical (qemu-img compare), and
 * the bytes sent again are a small fraction of a clean transfer's.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { test } from 'node:test';
import { verifyAuditLog } from '../../src/transfer/security.js';
import { realisticRawImage } from '../helpers/images.js';
import { run, tmpDir } from '../helpers/index.js';
import { exited, identical, prng, sendChild, serveChild, TOKEN } from './support.js';

const env = { VMFERRY_TOKEN: TOKEN };
/** Uncompressed on the wire, so the byte counts follow the data. */
const COMMON = ['-c', 'none', '--streams', '2', '--output', 'json'];

function setup(): { root: string; tokenFile: string } {
  const dir = tmpDir('vmferry-resume-');
  const root = join(dir, 'root');
  mkdirSync(root);
  const tokenFile = join(dir, 'token');
  writeFileSync(tokenFile, `${TOKEN}\n`);
  return { root, tokenFile };
}

/** qemu-img check's exit code (0 = clean); qemu-img has no check for raw and vpc. */
function qemuCheck(path: string, format: string): number {
  return run('qemu-img', ['check', '-f', format, path]).code;
}

/** The bytes a clean, uninterrupted send puts on the wire (same image, same parameters). */
async function cleanWire(url: string, src: string): Promise<number> {
  const clean = await sendChild([...COMMON, src, `${url}/clean.raw`], env);
  assert.equal(clean.code, 0, clean.stderr);
  return (JSON.parse(clean.stdout) as { wireBytes: number }).wireBytes;
}

test('kill -9 of the sender at random points: the same send resumes, identical, little re-sent', async (t) => {
  const src = realisticRawImage();
  const { root, tokenFile } = setup();
  const agent = await serveChild(root, tokenFile, ['--checkpoint-every', '2M']);
  try {
    const W = await cleanWire(agent.url, src);
    const rate = String(Math.floor(W / 2)); // about two seconds per send
    for (const [seed, fmt] of [
      [11, 'raw'],
      [12, 'qcow2'],
      [13, 'vdi'],
    ] as const) {
      const rnd = prng(seed);
      const name = `sender-kill-${seed}.${fmt}`;
      const killAt = 600 + Math.floor(rnd() * 1400);
      const first = await sendChild([...COMMON, '-O', fmt, '--rate', rate, src, `${agent.url}/${name}`], env, killAt);
      assert.equal(first.signal, 'SIGKILL', `the first send finished before the kill at ${killAt} ms: ${first.stderr}`);
      const second = await sendChild([...COMMON, '-O', fmt, src, `${agent.url}/${name}`], env);
      assert.equal(second.code, 0, second.stderr);
      const r = JSON.parse(second.stdout) as { resumedAt: number; agentReceivedBytes: number; wireBytes: number };
      assert.ok(identical(src, join(root, name), fmt), `${name} identical`);
      // The agent counted every byte it received for this name over both runs.
      const resent = r.agentReceivedBytes - W;
      t.diagnostic(
        `${name}: killed at ${killAt} ms, resumed at ${r.resumedAt}, re-sent ${resent} of ${W} bytes (${((100 * resent) / W).toFixed(1)}%)`,
      );
      assert.ok(resent >= 0 && resent <= 0.25 * W, `re-sent ${resent} of ${W}`);
    }
  } finally {
    agent.child.kill('SIGTERM');
    await exited(agent.child);
  }
});

/** Target formats of the agent-kill test, with the -o options they are sent with. */
const AGENT_KILL_CASES: [number, string, string[]][] = [
  [21, 'raw', []],
  [22, 'qcow2', []],
  [23, 'vdi', []],
  [24, 'vpc', []],
  [25, 'vhdx', []],
  [26, 'vmdk', ['-o', 'subformat=streamOptimized']],
  [27, 'vmdk', []],
];

test('kill -9 of the agent at random points: a restarted agent resumes from its checkpoint, identical', async (t) => {
  const src = realisticRawImage();
  const { root, tokenFile } = setup();
  let agent = await serveChild(root, tokenFile, ['--checkpoint-every', '2M']);
  try {
    const W = await cleanWire(agent.url, src);
    const rate = String(Math.floor(W / 2));
    for (const [seed, fmt, opts] of AGENT_KILL_CASES) {
      const rnd = prng(seed);
      const name = `agent-kill-${seed}.${fmt}`;
      // Late enough that several 2 MiB checkpoints were taken, early enough to beat the end. The
      // clock starts when the agent opens the output: counted from the sender's launch, its
      // start-up under a loaded CI (up to a second) decided how far the transfer got, once only
      // 8 MB of 47.
      const killAt = 500 + Math.floor(rnd() * 900);
      const victim = agent;
      let timer: NodeJS.Timeout | undefined;
      const partial = join(root, '.vmferry-partial');
      const watch = setInterval(() => {
        if (!readdirSync(partial).some((f) => f.includes(name))) return;
        clearInterval(watch);
        timer = setTimeout(() => victim.child.kill('SIGKILL'), killAt);
      }, 10);
      const first = await sendChild([...COMMON, '-O', fmt, ...opts, '--rate', rate, src, `${agent.url}/${name}`], env);
      clearInterval(watch);
      clearTimeout(timer);
      // A send that beat the kill fails the assertion below instead of waiting for the agent forever.
      victim.child.kill('SIGKILL');
      await exited(victim.child);
      assert.notEqual(first.code, 0, `the first send finished before the agent was killed at ${killAt} ms`);
      const m = /\((\d+) bytes were sent in this run/.exec(first.stderr);
      const sentBefore = m ? Number(m[1]) : 0;
      agent = await serveChild(root, tokenFile, ['--checkpoint-every', '2M']);
      const second = await sendChild([...COMMON, '-O', fmt, ...opts, src, `${agent.url}/${name}`], env);
      assert.equal(second.code, 0, second.stderr);
      const r = JSON.parse(second.stdout) as { resumedAt: number; wireBytes: number; note?: string };
      assert.ok(identical(src, join(root, name), fmt), `${name} identical`);
      if (fmt !== 'raw' && fmt !== 'vpc') assert.equal(qemuCheck(join(root, name), fmt), 0, `${name}: qemu-img check clean`);
      const resent = sentBefore + r.wireBytes - W;
      t.diagnostic(
        `${name}: agent killed at ${killAt} ms after ${sentBefore} bytes, resumed at ${r.resumedAt}, re-sent ${resent} of ${W} (${((100 * resent) / W).toFixed(1)}%)${r.note ? `; ${r.note}` : ''}`,
      );
      assert.ok(sentBefore > 8 * 1024 * 1024, `the agent was killed after only ${sentBefore} bytes`);
      assert.ok(r.resumedAt > 0, `${name} resumed past the start`);
      assert.equal(r.note, undefined);
      assert.ok(resent <= 0.3 * W, `re-sent ${resent} of ${W}`);
    }
    // Whatever was killed, nothing partial is left in ROOT, and the audit chain holds across restarts.
    assert.deepEqual(readdirSync(join(root, '.vmferry-partial')), []);
    assert.ok(verifyAuditLog(join(root, '.vmferry-audit.log')).ok);
  } finally {
    agent.child.kill('SIGTERM');
    await exited(agent.child);
  }
});

test('a checkpoint state that does not match its file: the restarted agent says so and restarts from zero', async () => {
  const src = realisticRawImage();
  const { root, tokenFile } = setup();
  let agent = await serveChild(root, tokenFile, ['--checkpoint-every', '2M']);
  try {
    const W = await cleanWire(agent.url, src);
    const name = 'tampered.vhdx';
    const victim = agent;
    const timer = setTimeout(() => victim.child.kill('SIGKILL'), 1200);
    const first = await sendChild(
      [...COMMON, '-O', 'vhdx', '--rate', String(Math.floor(W / 2)), src, `${agent.url}/${name}`],
      env,
    );
    clearTimeout(timer);
    await exited(victim.child);
    assert.notEqual(first.code, 0, 'the first send finished before the agent was killed');
    // The saved writer state now claims a longer file than the one on disk.
    const statePath = join(root, '.vmferry-partial', name, 'state.json');
    const saved = JSON.parse(readFileSync(statePath, 'utf8')) as { writerState: Record<string, unknown> };
    saved.writerState.length = (saved.writerState.length as number) + 4096;
    writeFileSync(statePath, JSON.stringify(saved));
    agent = await serveChild(root, tokenFile, ['--checkpoint-every', '2M']);
    const second = await sendChild([...COMMON, '-O', 'vhdx', src, `${agent.url}/${name}`], env);
    assert.equal(second.code, 0, second.stderr);
    const r = JSON.parse(second.stdout) as { resumedAt: number; note?: string };
    assert.equal(r.resumedAt, 0);
    assert.match(r.note ?? '', /could not be resumed .*altered or damaged.*restarted from zero/);
    assert.ok(identical(src, join(root, name), 'vhdx'), `${name} identical`);
  } finally {
    agent.child.kill('SIGTERM');
    await exited(agent.child);
  }
});

test('a half-written disk whose writer keeps no checkpoint (monolithicFlat VMDK): the restarted agent says it restarts from zero', async () => {
  const src = realisticRawImage();
  const { root, tokenFile } = setup();
  let agent = await serveChild(root, tokenFile, ['--checkpoint-every', '2M']);
  try {
    const W = await cleanWire(agent.url, src);
    const name = 'flat.vmdk';
    const args = ['-O', 'vmdk', '-o', 'subformat=monolithicFlat'];
    const victim = agent;
    const timer = setTimeout(() => victim.child.kill('SIGKILL'), 1200);
    const first = await sendChild([...COMMON, ...args, '--rate', String(Math.floor(W / 2)), src, `${agent.url}/${name}`], env);
    clearTimeout(timer);
    await exited(victim.child);
    assert.notEqual(first.code, 0, 'the first send finished before the agent was killed');
    agent = await serveChild(root, tokenFile, ['--checkpoint-every', '2M']);
    const second = await sendChild([...COMMON, ...args, src, `${agent.url}/${name}`], env);
    assert.equal(second.code, 0, second.stderr);
    const r = JSON.parse(second.stdout) as { resumedAt: number; note?: string };
    assert.equal(r.resumedAt, 0);
    assert.match(r.note ?? '', /cannot resume this half-written image|no checkpoint was saved/);
    assert.ok(identical(src, join(root, name), 'vmdk'), `${name} identical`);
  } finally {
    agent.child.kill('SIGTERM');
    await exited(agent.child);
  }
});
