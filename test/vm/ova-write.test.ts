/**
 * The OVA target: NAME.ova checked by independent consumers (GNU tar for member order, xmllint with
 * the DMTF OVF schema, sha256sum for the manifest, qemu-img info/compare for the disk), and a round
 * trip through the OVF reader.
 */
import assert from 'node:assert/strict';
import { mkdirSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { describe, test } from 'node:test';
import type { TargetDisk } from '../../src/vm/dialect.js';
import { emptyModel, MiB, type VmModel } from '../../src/vm/model.js';
import { readOvf } from '../../src/vm/readers/ovf.js';
import { targetWriter } from '../../src/vm/registry.js';
import { ovaTarget, STREAM_OPTIMIZED_URI } from '../../src/vm/targets/ova.js';
import { vmwareGuestId } from '../../src/vm/targets/vmware.js';
import { corpusDir, qemuImg, runOk, tmpDir } from '../helpers/index.js';

const XSD = join(corpusDir, '../schemas/ovf/dsp8023_1.1.1.xsd');

function model(firmware: 'bios' | 'uefi'): VmModel {
  const m = emptyModel(`web-${firmware}`, 'vmware');
  m.firmware = firmware;
  if (firmware === 'uefi') m.secureBoot = false;
  m.cpus = 4;
  m.coresPerSocket = 2;
  m.memory = 2048 * MiB;
  m.guest = { sourceId: 'debian12-64', family: 'linux', is64bit: true };
  m.controllers = [
    { id: 'scsi0', bus: 'scsi', model: firmware === 'uefi' ? 'pvscsi' : 'lsilogic' },
    { id: 'ide1', bus: 'ide' },
    { id: 'sata0', bus: 'sata' },
  ];
  m.disks = [
    { path: '/src/a.vmdk', bus: 'scsi', controller: 'scsi0', unit: 0, capacity: 64 * MiB },
    { path: '/src/b.vmdk', bus: 'sata', controller: 'sata0', unit: 0, capacity: 16 * MiB },
  ];
  m.cdroms = [{ bus: 'ide', controller: 'ide1', unit: 0 }];
  m.nics = [
    { model: 'vmxnet3', mac: '00:50:56:00:00:0a', network: 'Frontend' },
    { model: 'e1000', network: 'VM Network' },
  ];
  m.unmapped = [{ key: 'virtualHW.version', value: '14' }];
  return m;
}

describe('ova target', () => {
  test('is registered with a streamOptimized disk profile', () => {
    assert.equal(targetWriter('ova'), ovaTarget);
    assert.deepEqual(ovaTarget.profile.diskOptions, { subformat: 'streamOptimized' });
    assert.equal(ovaTarget.profile.diskFormat, 'vmdk');
  });

  for (const firmware of ['bios', 'uefi'] as const) {
    test(`${firmware}: tar order, DMTF schema, manifest, disks, round trip`, async () => {
      const out = tmpDir('vmferry-ova-write-');
      const src = model(firmware);
      const name = src.name;
      // Source disks with content, converted to streamOptimized (as the migrate pipeline does).
      const disks: TargetDisk[] = [];
      const sources: string[] = [];
      src.disks.forEach((d, i) => {
        const raw = join(out, `source${i}.raw`);
        qemuImg('create', '-f', 'raw', raw, String(d.capacity));
        runOk('qemu-io', ['-f', 'raw', '-c', `write -P ${0x11 + i} ${i}M 2M`, raw]);
        const fileName = `${name}-disk${i}.vmdk`;
        qemuImg('convert', '-f', 'raw', '-O', 'vmdk', '-o', 'subformat=streamOptimized', raw, join(out, fileName));
        disks.push({ index: i, fileName, format: 'vmdk', capacity: d.capacity! });
        sources.push(raw);
      });
      const files = await ovaTarget.write(src, disks, out);
      assert.deepEqual(files, [`${name}.ova`]);
      const ova = join(out, files[0]!);
      assert.deepEqual(
        readdirSync(out).filter((f) => f.includes('.vmferry-tmp-')),
        [],
        'no temp file left',
      );

      // GNU tar: the OVF first, then the disks, then the manifest.
      const listing = runOk('tar', ['tvf', ova]).trim().split('\n');
      assert.deepEqual(
        listing.map((l) => l.split(/\s+/).pop()),
        [`${name}.ovf`, `${name}-disk0.vmdk`, `${name}-disk1.vmdk`, `${name}.mf`],
      );
      const x = join(out, 'extracted');
      mkdirSync(x);
      runOk('tar', ['xf', ova, '-C', x]);

      // xmllint with the DMTF schema.
      const ovf = join(x, `${name}.ovf`);
      runOk('xmllint', ['--noout', '--schema', XSD, ovf]);
      const text = readFileSync(ovf, 'utf8');
      assert.match(text, /<vssd:VirtualSystemType>vmx-14<\/vssd:VirtualSystemType>/);
      assert.equal(text.split(`ovf:format="${STREAM_OPTIMIZED_URI}"`).length - 1, 2);
      assert.match(text, new RegExp(`vmw:key="firmware" vmw:value="${firmware === 'uefi' ? 'efi' : 'bios'}"`));
      assert.match(text, /ovf:populatedSize="\d+"/);
      assert.match(text, firmware === 'uefi' ? /<rasd:ResourceSubType>VirtualSCSI</ : /<rasd:ResourceSubType>lsilogic</);

      // sha256sum checks the manifest's lines.
      const checked = runOk('sha256sum', ['-c', `${name}.mf`], { cwd: x });
      assert.equal(checked.trim().split('\n').length, 3);
      assert.ok(
        checked
          .trim()
          .split('\n')
          .every((l) => l.endsWith(': OK')),
      );

      // qemu-img: each disk is a streamOptimized VMDK with the source's content.
      for (const [i, d] of disks.entries()) {
        const info = JSON.parse(qemuImg('info', '--output=json', join(x, d.fileName)));
        assert.equal(info.format, 'vmdk');
        assert.equal(info['virtual-size'], d.capacity);
        assert.equal(info['format-specific'].data['create-type'], 'streamOptimized');
        assert.match(text, new RegExp(`ovf:capacity="${d.capacity}"`));
        assert.match(qemuImg('compare', '-f', 'raw', '-F', 'vmdk', sources[i]!, join(x, d.fileName)), /identical/);
      }

      // Round trip: the OVF reader gives the same machine.
      const back = await readOvf(ova);
      assert.equal(back.name, name);
      assert.equal(back.firmware, firmware);
      if (firmware === 'uefi') assert.equal(back.secureBoot, false);
      assert.equal(back.cpus, src.cpus);
      assert.equal(back.coresPerSocket, src.coresPerSocket);
      assert.equal(back.memory, src.memory);
      assert.equal(vmwareGuestId(back.guest), 'debian12-64');
      assert.deepEqual(
        back.controllers,
        [...src.controllers].sort((a, b) => a.id.localeCompare(b.id)),
      );
      assert.deepEqual(
        back.disks.map((d) => ({ bus: d.bus, controller: d.controller, unit: d.unit, capacity: d.capacity, format: d.format })),
        src.disks.map((d) => ({ bus: d.bus, controller: d.controller, unit: d.unit, capacity: d.capacity, format: 'vmdk' })),
      );
      assert.deepEqual(back.cdroms, src.cdroms);
      assert.deepEqual(
        back.nics.map(({ model, mac, network }) => ({ model, mac, network })),
        src.nics.map(({ model, mac, network }) => ({ model, mac, network })),
      );
      assert.equal(new Map(back.unmapped.map((u) => [u.key, u.value])).get('virtualHW.version'), '14');
      assert.deepEqual(back.warnings, []);
    });
  }
});
