import assert from 'node:assert/strict';
import { mkdirSync, writeFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import { UsageError, VmferryError } from '../../src/disk/errors.js';
import { MiB } from '../../src/vm/model.js';
import { diskReader, readBareDisk } from '../../src/vm/readers/disk.js';
import { detectVmReader } from '../../src/vm/registry.js';
import { qemuImg, runOk, tmpDir } from '../helpers/index.js';

/** A raw disk with a partition table written by sfdisk (util-linux), then converted by qemu-img. */
function partitioned(dir: string, name: string, script: string, format = 'qcow2'): string {
  const raw = join(dir, `${name}.raw`);
  runOk('truncate', ['-s', '64M', raw]);
  runOk('sfdisk', ['-q', raw], { input: script });
  if (format === 'raw') return raw;
  const out = join(dir, `${name}.${format}`);
  qemuImg('convert', '-f', 'raw', '-O', format, raw, out);
  return out;
}

describe('bare disk reader', () => {
  test('a qcow2 image: one SATA boot disk of its size and format, name from the file, defaults listed as warnings', async () => {
    const dir = tmpDir();
    const p = join(dir, 'server-01.qcow2');
    qemuImg('create', '-q', '-f', 'qcow2', p, '32M');
    assert.equal(detectVmReader(p).platform, 'disk');
    const m = await diskReader.read(p, {});
    assert.equal(m.name, 'server-01');
    assert.equal(m.sourcePlatform, 'disk');
    assert.deepEqual(
      m.disks.map((d) => [d.path, d.format, d.capacity, d.bus, d.bootOrder]),
      [[p, 'qcow2', 32 * MiB, 'sata', 1]],
    );
    assert.equal(m.firmware, 'bios');
    assert.equal(m.cpus, 1);
    assert.ok(m.warnings.some((w) => /firmware not known/.test(w)));
  });

  test('firmware from the partition table: GPT + ESP -> UEFI, GPT + BIOS boot -> BIOS, MBR -> BIOS, MBR type ef -> UEFI', async () => {
    const dir = tmpDir();
    const cases: [string, string, string][] = [
      ['esp', 'label: gpt\n,16M,U\n,,L\n', 'uefi'],
      ['biosboot', 'label: gpt\n,1M,21686148-6449-6E6F-744E-656564454649\n,,L\n', 'bios'],
      ['mbr', 'label: dos\n,,83,*\n', 'bios'],
      ['mbr-esp', 'label: dos\n,16M,ef\n,,83\n', 'uefi'],
    ];
    for (const [name, script, firmware] of cases) {
      for (const format of ['raw', 'vmdk']) {
        const m = await readBareDisk(partitioned(dir, `${name}-${format}`, script, format));
        assert.equal(m.firmware, firmware, `${name} as ${format}`);
        assert.ok(
          m.warnings.some((w) => w.includes('inferred')),
          `${name}: the guess is reported`,
        );
      }
    }
  });

  test('options say what the image cannot: firmware, CPUs, memory, name', async () => {
    const dir = tmpDir();
    const p = partitioned(dir, 'gpt', 'label: gpt\n,16M,U\n', 'qcow2');
    const m = await readBareDisk(p, { firmware: 'bios', cpus: 4, memory: 2048 * MiB, name: 'db01' });
    assert.deepEqual([m.name, m.firmware, m.cpus, m.memory], ['db01', 'bios', 4, 2048 * MiB]);
    assert.equal(m.warnings.length, 0, m.warnings.join('; '));
    await assert.rejects(readBareDisk(p, { cpus: 0 }), UsageError);
    await assert.rejects(readBareDisk(p, { memory: 5 }), UsageError);
  });

  test('a folder or a missing file is a typed error naming it', async () => {
    const dir = tmpDir();
    const sub = join(dir, 'folder');
    mkdirSync(sub);
    for (const p of [sub, join(dir, 'missing.img')]) {
      await assert.rejects(readBareDisk(p), (err: unknown) => err instanceof VmferryError && err.file === p);
    }
    const text = join(dir, 'notes.txt');
    writeFileSync(text, '# just text\n');
    assert.equal(diskReader.detect(text, Buffer.from('# just text\n')), 0);
  });
});
