/**
 * `vmferry migrate SOURCE --to T --out http(s)://HOST:PORT/PREFIX`: the disks go straight from the
 * source to a loopback agent, the descriptors after them, report.json last. Judged by qemu-img
 * compare (each disk on the agent against the raw content it was built from), virt-xml-validate
 * (the libvirt XML), the SHA-256 of the files on the agent (the OVF manifest) and the audit log.
 */
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { createHash } from 'node:crypto';
import {
  closeSync,
  existsSync,
  ftruncateSync,
  mkdirSync,
  openSync,
  readdirSync,
  readFileSync,
  realpathSync,
  statSync,
  truncateSync,
  writeFileSync,
  writeSync,
} from 'node:fs';
import http from 'node:http';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { after, before, describe, test } from 'node:test';
import '../../src/formats/index.js';
import { type Agent, startAgent } from '../../src/transfer/agent.js';
import { certFingerprint, ensureCertificate, verifyAuditLog } from '../../src/transfer/security.js';
import { patternBuffer, qemuImg, run, runOk, sha256ViaLibyal, tmpDir, vmferryBin } from '../helpers/index.js';
import { TOKEN } from './support.js';

const MiB = 1024 * 1024;
const dir = tmpDir('vmferry-mr-');

/** A raw GPT disk (sfdisk) with patterned data in a few places; holes elsewhere. */
function gptDisk(path: string, size: number, seed: number): string {
  const fd = openSync(path, 'w');
  ftruncateSync(fd, size);
  writeSync(fd, patternBuffer(MiB, seed), 0, MiB, 6 * MiB);
  writeSync(fd, patternBuffer(MiB / 2, seed + 1), 0, MiB / 2, size - 3 * MiB);
  closeSync(fd);
  runOk('sfdisk', ['--quiet', path], { input: 'label: gpt\nstart=2048, size=4096, type=uefi\nstart=6144, type=linux\n' });
  return path;
}

/** A VMware VM: web.vmx + two VMDKs made by qemu-img from raw GPT disks. */
function vmwareVm(): { vmx: string; raws: string[] } {
  const folder = join(dir, 'src-web');
  mkdirSync(folder);
  const raws = [gptDisk(join(dir, 'web0.raw'), 16 * MiB, 3), gptDisk(join(dir, 'web1.raw'), 12 * MiB, 9)];
  raws.forEach((raw, i) => {
    qemuImg('convert', '-f', 'raw', '-O', 'vmdk', raw, join(folder, `web-${i}.vmdk`));
  });
  const lines = [
    '.encoding = "UTF-8"',
    'config.version = "8"',
    'virtualHW.version = "19"',
    'displayName = "web"',
    'guestOS = "debian11-64"',
    'memsize = "1024"',
    'numvcpus = "2"',
    'firmware = "efi"',
    'scsi0.present = "TRUE"',
    'scsi0.virtualDev = "pvscsi"',
    'scsi0:0.present = "TRUE"',
    'scsi0:0.fileName = "web-0.vmdk"',
    'scsi0:1.present = "TRUE"',
    'scsi0:1.fileName = "web-1.vmdk"',
    'ethernet0.present = "TRUE"',
    'ethernet0.virtualDev = "vmxnet3"',
    'ethernet0.addressType = "static"',
    'ethernet0.address = "00:50:56:3f:00:01"',
  ];
  writeFileSync(join(folder, 'web.vmx'), `${lines.join('\n')}\n`);
  return { vmx: join(folder, 'web.vmx'), raws };
}

const vm = vmwareVm();

/**
 * A VMware VM for Azure: disk0 is no whole number of MiB (10 MiB + 3 sectors, its GPT backup
 * header in the last sectors, so the source's own last bytes are not zero), disk1 is exactly 8 MiB.
 */
function azureVm(): { vmx: string; raws: string[]; sizes: number[] } {
  const folder = join(dir, 'src-app');
  mkdirSync(folder);
  const sizes = [10 * MiB + 1536, 8 * MiB];
  const raws = sizes.map((size, i) => gptDisk(join(dir, `app${i}.raw`), size, 20 + i));
  raws.forEach((raw, i) => {
    qemuImg('convert', '-f', 'raw', '-O', 'vmdk', raw, join(folder, `app-${i}.vmdk`));
  });
  const lines = [
    'config.version = "8"',
    'virtualHW.version = "19"',
    'displayName = "app"',
    'guestOS = "ubuntu-64"',
    'memsize = "2048"',
    'numvcpus = "2"',
    'firmware = "efi"',
    'scsi0.present = "TRUE"',
    'scsi0.virtualDev = "pvscsi"',
    'scsi0:0.present = "TRUE"',
    'scsi0:0.fileName = "app-0.vmdk"',
    'scsi0:1.present = "TRUE"',
    'scsi0:1.fileName = "app-1.vmdk"',
    'ethernet0.present = "TRUE"',
    'ethernet0.virtualDev = "vmxnet3"',
  ];
  writeFileSync(join(folder, 'app.vmx'), `${lines.join('\n')}\n`);
  return { vmx: join(folder, 'app.vmx'), raws, sizes };
}

interface Run {
  code: number | null;
  stdout: string;
  stderr: string;
}

/** `vmferry migrate` as a child, asynchronously (the agent runs in this process). */
function migrateCli(args: string[], env: NodeJS.ProcessEnv = {}): Promise<Run> {
  return new Promise((resolve) => {
    const child = spawn(process.execPath, [vmferryBin, 'migrate', ...args], {
      stdio: ['ignore', 'pipe', 'pipe'],
      env: { ...process.env, VMFERRY_TOKEN: '', ...env },
      cwd: dir,
    });
    let stdout = '';
    let stderr = '';
    child.stdout!.on('data', (d: Buffer) => {
      stdout += d.toString();
    });
    child.stderr!.on('data', (d: Buffer) => {
      stderr += d.toString();
    });
    child.once('exit', (code) => resolve({ code, stdout, stderr }));
  });
}

function sha256File(path: string): string {
  return createHash('sha256').update(readFileSync(path)).digest('hex');
}

function compare(raw: string, image: string, format: string): number {
  return run('qemu-img', ['compare', '-f', 'raw', '-F', format, raw, image]).code ?? -1;
}

function auditEntries(agent: Agent): Record<string, unknown>[] {
  const v = verifyAuditLog(agent.auditPath);
  assert.ok(v.ok, `audit chain broken at line ${v.brokenAt}`);
  return v.entries;
}

interface Report {
  tool: string;
  outDir: string;
  agentDir: string;
  files: string[];
  disks: {
    target: string;
    targetFormat: string;
    sourceSha256: string;
    targetSha256: string;
    digestAlgorithm?: string;
    verified: boolean;
    targetFileBytes: number;
    transfer?: { url: string; wireBytes: number; fileSha256?: string };
  }[];
}

describe('migrate --out http://127.0.0.1 (insecure loopback agent)', () => {
  let agent: Agent;
  let root: string;
  before(async () => {
    root = join(tmpDir('vmferry-mr-agent-'), 'root');
    mkdirSync(root);
    agent = await startAgent({ host: '127.0.0.1', port: 0, root, token: TOKEN });
  });
  after(async () => {
    await agent.close();
  });

  test('--to libvirt: disks sent straight into ROOT/PREFIX, XML names them there and validates, report last', async () => {
    const r = await migrateCli([vm.vmx, '--to', 'libvirt', '--out', `${agent.url}/vm1`, '-c', 'zstd', '--output=json'], {
      VMFERRY_TOKEN: TOKEN,
    });
    assert.equal(r.code, 0, r.stderr);
    const folder = join(root, 'vm1');
    assert.deepEqual(readdirSync(folder).sort(), ['report.json', 'report.txt', 'web-disk0.qcow2', 'web-disk1.qcow2', 'web.xml']);
    // Nothing landed in a local folder named like the URL's path, nor in the agent's root itself.
    assert.ok(!existsSync(join(dir, 'vm1')));
    assert.deepEqual(
      readdirSync(root)
        .filter((n) => !n.startsWith('.'))
        .sort(),
      ['vm1'],
    );
    // Each disk on the agent holds the guest content it was built from (qemu-img's verdict).
    for (const i of [0, 1]) {
      const disk = join(folder, `web-disk${i}.qcow2`);
      assert.equal(JSON.parse(qemuImg('info', '--output=json', disk)).format, 'qcow2');
      assert.equal(compare(vm.raws[i]!, disk, 'qcow2'), 0, `disk${i} differs from its source`);
      assert.equal(run('qemu-img', ['check', disk]).code, 0);
    }
    // The XML is valid libvirt and names the disks where they landed on the agent.
    const xml = join(folder, 'web.xml');
    const valid = run('virt-xml-validate', [xml, 'domain']);
    assert.equal(valid.code, 0, valid.stderr + valid.stdout);
    const sources = [...readFileSync(xml, 'utf8').matchAll(/<source file='([^']+\.qcow2)'\/>/g)].map((m) => m[1]);
    const real = realpathSync(folder);
    assert.deepEqual(sources, [join(real, 'web-disk0.qcow2'), join(real, 'web-disk1.qcow2')]);
    assert.ok(!readFileSync(xml, 'utf8').includes('vmferry-migrate-remote-'), 'the XML names the local temp folder');
    // The report: both digests recorded and equal, the files listed, the agent's folder named.
    const report = JSON.parse(readFileSync(join(folder, 'report.json'), 'utf8')) as Report;
    const printed = JSON.parse(r.stdout) as Report;
    assert.equal(printed.agentDir, real);
    assert.equal(report.outDir, `${agent.url}/vm1`);
    assert.deepEqual(report.files.sort(), ['report.txt', 'web-disk0.qcow2', 'web-disk1.qcow2', 'web.xml']);
    for (const [i, d] of report.disks.entries()) {
      assert.equal(d.digestAlgorithm, 'vmferry-transfer');
      assert.match(d.sourceSha256, /^[0-9a-f]{64}$/);
      assert.equal(d.targetSha256, d.sourceSha256);
      assert.ok(d.verified);
      assert.equal(d.targetFileBytes, statSync(join(folder, `web-disk${i}.qcow2`)).size);
      assert.equal(d.transfer?.url, `${agent.url}/vm1/web-disk${i}.qcow2`);
    }
    // The digests differ between the two disks (they are not a constant).
    assert.notEqual(report.disks[0]!.sourceSha256, report.disks[1]!.sourceSha256);
    // Audit: each disk completed, then the descriptor, report.txt and report.json, in that order.
    const events = auditEntries(agent).filter((e) => e.event === 'complete' || e.event === 'file');
    assert.deepEqual(
      events.map((e) => `${e.event} ${e.name}`),
      [
        'complete vm1/web-disk0.qcow2',
        'complete vm1/web-disk1.qcow2',
        'file vm1/web.xml',
        'file vm1/report.txt',
        'file vm1/report.json',
      ],
    );
    const reportEvent = events.at(-1)!;
    assert.equal(reportEvent.sha256, sha256File(join(folder, 'report.json')));

    // A rerun replaces the result in place (same names), and it still compares equal.
    const again = await migrateCli([vm.vmx, '--to', 'libvirt', '--out', `${agent.url}/vm1`], { VMFERRY_TOKEN: TOKEN });
    assert.equal(again.code, 0, again.stderr);
    assert.equal(compare(vm.raws[0]!, join(folder, 'web-disk0.qcow2'), 'qcow2'), 0);
    assert.deepEqual(readdirSync(folder).sort(), ['report.json', 'report.txt', 'web-disk0.qcow2', 'web-disk1.qcow2', 'web.xml']);
  });

  test('--to ova: the OVF package unpacked under PREFIX, manifest digests match the files on the agent', async () => {
    const r = await migrateCli([vm.vmx, '--to', 'ova', '--out', `${agent.url}/vm2`, '-c', 'zlib'], { VMFERRY_TOKEN: TOKEN });
    assert.equal(r.code, 0, r.stderr);
    const folder = join(root, 'vm2');
    assert.deepEqual(readdirSync(folder).sort(), [
      'report.json',
      'report.txt',
      'web-disk0.vmdk',
      'web-disk1.vmdk',
      'web.mf',
      'web.ovf',
    ]);
    for (const i of [0, 1]) {
      const disk = join(folder, `web-disk${i}.vmdk`);
      const info = JSON.parse(qemuImg('info', '--output=json', disk)) as {
        format: string;
        'format-specific'?: { data?: { 'create-type'?: string } };
      };
      assert.equal(info.format, 'vmdk');
      assert.equal(info['format-specific']?.data?.['create-type'], 'streamOptimized');
      assert.equal(compare(vm.raws[i]!, disk, 'vmdk'), 0, `disk${i} differs from its source`);
    }
    // The manifest's SHA-256 lines are those of the files as they lie on the agent.
    const mf = readFileSync(join(folder, 'web.mf'), 'utf8').trim().split('\n');
    assert.deepEqual(
      mf.sort(),
      ['web.ovf', 'web-disk0.vmdk', 'web-disk1.vmdk'].map((f) => `SHA256(${f})= ${sha256File(join(folder, f))}`).sort(),
    );
    // The OVF references each disk by its name beside it, with its real size; xmllint finds it well-formed.
    const ovf = readFileSync(join(folder, 'web.ovf'), 'utf8');
    for (const i of [0, 1]) {
      const size = statSync(join(folder, `web-disk${i}.vmdk`)).size;
      assert.match(ovf, new RegExp(`<File ovf:href="web-disk${i}\\.vmdk" ovf:id="file${i + 1}" ovf:size="${size}"/>`));
    }
    assert.equal(run('xmllint', ['--noout', join(folder, 'web.ovf')]).code, 0);
    // The unpacked package is a source vmferry itself reads back: its disks equal the originals.
    const back = join(dir, 'from-ovf');
    const m = await migrateCli([join(folder, 'web.ovf'), '--to', 'qemu', '--out', back]);
    assert.equal(m.code, 0, m.stderr);
    assert.equal(compare(vm.raws[1]!, join(back, 'web-disk1.qcow2'), 'qcow2'), 0);
  });

  test('--to azure: fixed VHDs rounded up to whole MiB on the agent, padded with zeros; descriptors as a local run writes them', async () => {
    const az = azureVm();
    const r = await migrateCli([az.vmx, '--to', 'azure', '--out', `${agent.url}/az1`, '--output=json'], { VMFERRY_TOKEN: TOKEN });
    assert.equal(r.code, 0, r.stderr);
    const folder = join(root, 'az1');
    const files = ['app-azure.json', 'app-azure.sh', 'app-disk0.vhd', 'app-disk1.vhd', 'report.json', 'report.txt'];
    assert.deepEqual(readdirSync(folder).sort(), files);
    const capacities = [11 * MiB, 8 * MiB];
    for (const i of [0, 1]) {
      const disk = join(folder, `app-disk${i}.vhd`);
      const cap = capacities[i]!;
      // qemu-img probes a fixed VHD as raw (its footer is at the end): the format is named.
      const info = JSON.parse(qemuImg('info', '-f', 'vpc', '--output=json', disk)) as { 'virtual-size': number };
      assert.equal(info['virtual-size'], cap, `disk${i}: virtual size`);
      assert.equal(statSync(disk).size, cap + 512, `disk${i}: a fixed VHD is its size + the footer`);
      // libvhdi reads the footer's disk type.
      assert.match(runOk('vhdiinfo', [disk]), /Disk type\s*:\s*Fixed/, `disk${i}: libvhdi's disk type`);
      // The content is the source's, then zeros up to the rounded size: against a padded copy of the
      // raw source (truncate), by qemu-img and by libvhdi.
      const padded = join(dir, `app${i}-padded.raw`);
      writeFileSync(padded, readFileSync(az.raws[i]!));
      truncateSync(padded, cap);
      assert.equal(statSync(padded).size - az.sizes[i]!, i === 0 ? MiB - 1536 : 0);
      assert.equal(compare(padded, disk, 'vpc'), 0, `disk${i} differs from its padded source`);
      assert.equal(sha256ViaLibyal('pyvhdi', disk), sha256File(padded), `disk${i}: libvhdi's content hash`);
    }
    // The source's last bytes (the GPT backup header) are not zero, so the padding starts past real data.
    assert.ok(
      !readFileSync(az.raws[0]!)
        .subarray(-512)
        .every((b) => b === 0),
    );
    const report = JSON.parse(r.stdout) as Omit<Report, 'disks'> & {
      disks: (Report['disks'][number] & { capacity: number; virtualSize: number })[];
      mappings: { from: string; to: string }[];
    };
    assert.deepEqual(
      report.disks.map((d) => [d.virtualSize, d.capacity]),
      [
        [az.sizes[0], capacities[0]],
        [az.sizes[1], capacities[1]],
      ],
    );
    assert.ok(report.mappings.some((m) => m.from === `disk0 size ${az.sizes[0]} bytes` && m.to === `${capacities[0]} bytes`));
    for (const [i, d] of report.disks.entries()) {
      assert.equal(d.digestAlgorithm, 'vmferry-transfer');
      assert.equal(d.targetSha256, d.sourceSha256);
      assert.equal(d.targetFileBytes, statSync(join(folder, `app-disk${i}.vhd`)).size);
    }
    // Disks complete first, then the descriptors, report.json last.
    assert.deepEqual(
      auditEntries(agent)
        .filter((e) => (e.event === 'complete' || e.event === 'file') && String(e.name).startsWith('az1/'))
        .map((e) => `${e.event} ${e.name}`),
      [
        'complete az1/app-disk0.vhd',
        'complete az1/app-disk1.vhd',
        'file az1/app-azure.json',
        'file az1/app-azure.sh',
        'file az1/report.txt',
        'file az1/report.json',
      ],
    );
    // A local run of the same migration writes the same descriptors, and disks of the same content.
    const local = join(dir, 'az-local');
    const l = await migrateCli([az.vmx, '--to', 'azure', '--out', local]);
    assert.equal(l.code, 0, l.stderr);
    for (const f of ['app-azure.json', 'app-azure.sh'])
      assert.equal(
        readFileSync(join(folder, f), 'utf8'),
        readFileSync(join(local, f), 'utf8'),
        `${f} differs from a local run's`,
      );
    for (const i of [0, 1]) {
      const c = run('qemu-img', [
        'compare',
        '-s',
        '-f',
        'vpc',
        '-F',
        'vpc',
        join(local, `app-disk${i}.vhd`),
        join(folder, `app-disk${i}.vhd`),
      ]);
      assert.equal(c.code, 0, c.stdout + c.stderr);
    }
    const desc = JSON.parse(readFileSync(join(folder, 'app-azure.json'), 'utf8')) as {
      disks: { file: string; sizeBytes: number }[];
    };
    assert.deepEqual(
      desc.disks.map((d) => [d.file, d.sizeBytes]),
      [
        ['app-disk0.vhd', capacities[0]],
        ['app-disk1.vhd', capacities[1]],
      ],
    );

    // -o that cannot make an Azure disk is refused before anything reaches the agent.
    const dynamic = await migrateCli([az.vmx, '--to', 'azure', '--out', `${agent.url}/az2`, '-o', 'subformat=dynamic'], {
      VMFERRY_TOKEN: TOKEN,
    });
    assert.notEqual(dynamic.code, 0);
    assert.equal(dynamic.stderr.trim().split('\n').length, 1, dynamic.stderr);
    assert.match(dynamic.stderr, /subformat=dynamic: Azure takes only fixed VHDs/);
    assert.ok(!existsSync(join(root, 'az2')));
    assert.ok(!auditEntries(agent).some((e) => String(e.name ?? e.path ?? '').includes('az2')));
  });

  test('a wrong token is refused before anything is written, and audited', async () => {
    const r = await migrateCli([vm.vmx, '--to', 'libvirt', '--out', `${agent.url}/vm3`], {
      VMFERRY_TOKEN: 'not-the-token-0123456789abcdef',
    });
    assert.notEqual(r.code, 0);
    assert.match(r.stderr, /wrong token/);
    assert.ok(!existsSync(join(root, 'vm3')));
    const refused = auditEntries(agent).filter((e) => e.event === 'refused' && e.reason === 'wrong token');
    assert.ok(refused.length >= 1);
    assert.ok(refused.some((e) => String(e.path).includes('vm3')));
    // No token at all: refused by the command before it reads anything.
    const none = await migrateCli([vm.vmx, '--to', 'libvirt', '--out', `${agent.url}/vm3`]);
    assert.notEqual(none.code, 0);
    assert.match(none.stderr, /token/);
    // A path that is not one folder name is refused by the command too.
    const deep = await migrateCli([vm.vmx, '--to', 'libvirt', '--out', `${agent.url}/a/b`], { VMFERRY_TOKEN: TOKEN });
    assert.notEqual(deep.code, 0);
    assert.match(deep.stderr, /exactly one folder name/);
  });
});

/** One raw request to the agent's file endpoint. */
function putRaw(
  url: string,
  name: string,
  body: Buffer,
  headers: Record<string, string>,
): Promise<{ status: number; body: Record<string, unknown> }> {
  return new Promise((resolve, reject) => {
    const req = http.request(
      new URL(`/v1/${name}/file`, url),
      { method: 'PUT', headers: { 'content-length': body.length, ...headers } },
      (res) => {
        const parts: Buffer[] = [];
        res.on('data', (d: Buffer) => parts.push(d));
        res.on('end', () => resolve({ status: res.statusCode ?? 0, body: JSON.parse(Buffer.concat(parts).toString()) }));
      },
    );
    req.on('error', reject);
    req.end(body);
  });
}

test('the whole-file endpoint: token, name rules, size limit, digest, no silent replace; each refusal audited', async () => {
  const base = tmpDir('vmferry-putfile-');
  const root = join(base, 'root');
  mkdirSync(root);
  const agent = await startAgent({ host: '127.0.0.1', port: 0, root, token: TOKEN, maxFileBytes: 1024 });
  try {
    const data = Buffer.from('<domain/>\n');
    const sha = createHash('sha256').update(data).digest('hex');
    const auth = { authorization: `Bearer ${TOKEN}`, 'x-vmferry-sha256': sha };
    const ok = await putRaw(agent.url, encodeURIComponent('p/d.xml'), data, auth);
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.deepEqual(readFileSync(join(root, 'p', 'd.xml')), data);
    assert.equal(ok.body.dir, join(realpathSync(root), 'p'));
    // Only the final file is there: no temp left beside it.
    assert.deepEqual(readdirSync(join(root, 'p')), ['d.xml']);
    const cases: [string, Buffer, Record<string, string>, number, RegExp][] = [
      ['p/d.xml', data, { 'x-vmferry-sha256': sha, authorization: 'Bearer wrong-token-0123456789' }, 401, /wrong token/],
      ['p/d.xml', data, { 'x-vmferry-sha256': sha }, 401, /no bearer token/],
      ['a/b/c.xml', data, auth, 400, /more than one folder level/],
      ['p/..', data, auth, 400, /'\.\.'/],
      ['../x.xml', data, auth, 400, /'\.\.'/],
      ['p/.hidden', data, auth, 400, /starts with '\.'/],
      ['p/big.xml', Buffer.alloc(2048, 1), auth, 413, /exceeds the limit of 1024/],
      ['p/bad.xml', data, { ...auth, 'x-vmferry-sha256': '0'.repeat(64) }, 422, /fails its digest/],
      [
        'p/d.xml',
        Buffer.from('other\n'),
        { ...auth, 'x-vmferry-sha256': createHash('sha256').update('other\n').digest('hex') },
        409,
        /already exists/,
      ],
    ];
    for (const [name, body, headers, status, message] of cases) {
      const r = await putRaw(agent.url, encodeURIComponent(name), body, headers);
      assert.equal(r.status, status, `${name}: ${JSON.stringify(r.body)}`);
      assert.match(String(r.body.error), message);
    }
    // Nothing of the refused requests was written; the first file is untouched.
    assert.deepEqual(readdirSync(join(root, 'p')), ['d.xml']);
    assert.deepEqual(readFileSync(join(root, 'p', 'd.xml')), data);
    assert.deepEqual(
      readdirSync(root)
        .filter((n) => !n.startsWith('.'))
        .sort(),
      ['p'],
    );
    // Replacing needs the overwrite header.
    const other = Buffer.from('<domain type="kvm"/>\n');
    const replaced = await putRaw(agent.url, encodeURIComponent('p/d.xml'), other, {
      ...auth,
      'x-vmferry-sha256': createHash('sha256').update(other).digest('hex'),
      'x-vmferry-overwrite': '1',
    });
    assert.equal(replaced.status, 200);
    assert.deepEqual(readFileSync(join(root, 'p', 'd.xml')), other);
    const entries = auditEntries(agent);
    const refusals = entries.filter((e) => e.event === 'refused').map((e) => String(e.reason));
    for (const want of [
      /wrong token/,
      /no bearer token/,
      /more than one folder level/,
      /'\.\.'/,
      /starts with '\.'/,
      /exceeds the limit/,
      /file exists/,
    ]) {
      assert.ok(
        refusals.some((r) => want.test(r)),
        `no audited refusal matching ${want}`,
      );
    }
    assert.ok(entries.some((e) => e.event === 'file-damaged' && e.name === 'p/bad.xml'));
    assert.deepEqual(
      entries.filter((e) => e.event === 'file').map((e) => [e.name, e.replaced]),
      [
        ['p/d.xml', false],
        ['p/d.xml', true],
      ],
    );
  } finally {
    await agent.close();
  }
});

test('migrate --to libvirt over HTTPS (TLS 1.3) with the certificate fingerprint pinned; a wrong pin sends nothing', async () => {
  const base = tmpDir('vmferry-migrate-tls-');
  const root = join(base, 'root');
  mkdirSync(root);
  ensureCertificate(join(base, 'cert.pem'), join(base, 'key.pem'), ['127.0.0.1']);
  const cert = readFileSync(join(base, 'cert.pem'));
  const agent = await startAgent({
    host: '127.0.0.1',
    port: 0,
    root,
    token: TOKEN,
    tls: { cert, key: readFileSync(join(base, 'key.pem')) },
  });
  try {
    assert.match(agent.url, /^https:/);
    const tokenFile = join(base, 'token');
    writeFileSync(tokenFile, `${TOKEN}\n`, { mode: 0o600 });
    // openssl's view of the fingerprint, independent of ours.
    const fp = runOk('openssl', ['x509', '-noout', '-fingerprint', '-sha256', '-in', join(base, 'cert.pem')])
      .trim()
      .replace(/^.*=/, '');
    assert.equal(fp, certFingerprint(cert));
    const wrong = `${fp.slice(0, -2)}${fp.endsWith('00') ? '11' : '00'}`;
    const refused = await migrateCli([
      vm.vmx,
      '--to',
      'libvirt',
      '--out',
      `${agent.url}/tls1`,
      '--token-file',
      tokenFile,
      '--fingerprint',
      wrong,
    ]);
    assert.notEqual(refused.code, 0);
    assert.match(refused.stderr, /does not match the pinned/);
    assert.ok(!existsSync(join(root, 'tls1')));

    const r = await migrateCli([
      vm.vmx,
      '--to',
      'libvirt',
      '--out',
      `${agent.url}/tls1`,
      '--token-file',
      tokenFile,
      '--fingerprint',
      fp,
    ]);
    assert.equal(r.code, 0, r.stderr);
    const folder = join(root, 'tls1');
    assert.deepEqual(readdirSync(folder).sort(), ['report.json', 'report.txt', 'web-disk0.qcow2', 'web-disk1.qcow2', 'web.xml']);
    for (const i of [0, 1]) assert.equal(compare(vm.raws[i]!, join(folder, `web-disk${i}.qcow2`), 'qcow2'), 0);
    const valid = run('virt-xml-validate', [join(folder, 'web.xml'), 'domain']);
    assert.equal(valid.code, 0, valid.stderr + valid.stdout);
    assert.ok(
      readFileSync(join(folder, 'web.xml'), 'utf8').includes(`<source file='${join(realpathSync(folder), 'web-disk0.qcow2')}'/>`),
    );
    const entries = auditEntries(agent);
    assert.ok(entries.some((e) => e.event === 'start' && e.tls === true));
    assert.equal(entries.filter((e) => e.event === 'file').at(-1)?.name, 'tls1/report.json');
  } finally {
    await agent.close();
  }
});

test('a migration killed while sending resumes where the agent stopped, and ends identical', async () => {
  // One disk with 20 MiB of incompressible data, sent at 4 MiB/s, so the kill lands mid-send.
  const folder = join(dir, 'src-big');
  mkdirSync(folder);
  const raw = join(dir, 'big.raw');
  const fd = openSync(raw, 'w');
  ftruncateSync(fd, 32 * MiB);
  writeSync(fd, patternBuffer(20 * MiB, 77), 0, 20 * MiB, 8 * MiB);
  closeSync(fd);
  qemuImg('convert', '-f', 'raw', '-O', 'vmdk', raw, join(folder, 'big.vmdk'));
  writeFileSync(
    join(folder, 'big.vmx'),
    [
      'config.version = "8"',
      'virtualHW.version = "19"',
      'displayName = "big"',
      'guestOS = "debian11-64"',
      'memsize = "512"',
      'numvcpus = "1"',
      'scsi0.present = "TRUE"',
      'scsi0.virtualDev = "lsilogic"',
      'scsi0:0.present = "TRUE"',
      'scsi0:0.fileName = "big.vmdk"',
      '',
    ].join('\n'),
  );
  const root = join(tmpDir('vmferry-mr-resume-'), 'root');
  mkdirSync(root);
  const agent = await startAgent({ host: '127.0.0.1', port: 0, root, token: TOKEN, checkpointBytes: 2 * MiB });
  try {
    const args = [join(folder, 'big.vmx'), '--to', 'libvirt', '--out', `${agent.url}/big`, '-c', 'none', '--output=json'];
    // Kill -9 the migration once the agent has checkpointed part of the disk.
    const state = join(root, '.vmferry-partial', '.sub', 'big', 'big-disk0.qcow2', 'state.json');
    const child = spawn(process.execPath, [vmferryBin, 'migrate', ...args, '--rate', '4M'], {
      stdio: 'ignore',
      env: { ...process.env, VMFERRY_TOKEN: TOKEN },
    });
    const exited = new Promise<string | null>((resolve) => child.once('exit', (_code, signal) => resolve(signal)));
    const watcher = setInterval(() => {
      if (existsSync(state)) child.kill('SIGKILL');
    }, 20);
    const signal = await exited;
    clearInterval(watcher);
    assert.equal(signal, 'SIGKILL', 'the migration ended before the agent checkpointed');
    assert.ok(!existsSync(join(root, 'big', 'report.json')), 'a killed run left a report');
    assert.ok(!existsSync(join(root, 'big', 'big-disk0.qcow2')), 'a killed run left a disk under its final name');
    // Its local temp folder (named with its pid) is left behind by kill -9...
    const temps = () => readdirSync(tmpdir()).filter((n) => n.startsWith(`vmferry-migrate-remote-${child.pid}-`));
    assert.equal(temps().length, 1);

    const again = await migrateCli(args, { VMFERRY_TOKEN: TOKEN });
    assert.equal(again.code, 0, again.stderr);
    const report = JSON.parse(again.stdout) as Report & {
      disks: { transfer: { resumedAt: number; dataBytes: number } }[];
      cleanedUp: string[];
    };
    // ...and the next run removes it.
    assert.deepEqual(temps(), []);
    assert.ok(report.cleanedUp.some((p) => p.includes(`vmferry-migrate-remote-${child.pid}-`)));
    assert.ok(report.disks[0]!.transfer.resumedAt > 0, 'the rerun started from zero');
    // The rerun carried only the rest of the data.
    assert.ok(report.disks[0]!.transfer.dataBytes < 20 * MiB);
    assert.equal(compare(raw, join(root, 'big', 'big-disk0.qcow2'), 'qcow2'), 0);
    assert.equal(run('qemu-img', ['check', join(root, 'big', 'big-disk0.qcow2')]).code, 0);
    assert.ok(auditEntries(agent).some((e) => e.event === 'resume' && e.name === 'big/big-disk0.qcow2'));
  } finally {
    await agent.close();
  }
});
