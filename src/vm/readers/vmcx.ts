/**
 * Hyper-V's binary configuration store (VMCX, also VMRS): an undocumented "HyperVStorage" file
 * holding a key/value tree. Layout as public readers (dissect.hypervisor) describe it, re-derived
 * and bounds-checked here:
 *
 *   0x0000 and 0x1000  storage headers (the one with the higher sequence number is active)
 *   0x2000             object table: typed blocks (key tables, file objects, replay logs)
 *   key table          a 10-byte header, then entries (21-byte header, key name, value) whose
 *                      parent is addressed by (table index, offset in that table)
 *
 * All integers are little-endian and the structures are packed.
 */
import { CorruptImageError, UnsupportedFeatureError } from '../../disk/errors.js';

const STORAGE_SIGNATURE = 0x01282014;
const OBJECT_TABLE_SIGNATURE = 0x01110001;
const KEY_TABLE_SIGNATURE = 0x0002;
const HEADER_OFFSETS = [0x0000, 0x1000];
const OBJECT_TABLE_OFFSET = 0x2000;
const OBJECT_ENTRY_SIZE = 18;
const KEY_TABLE_HEADER_SIZE = 10;
const KEY_ENTRY_HEADER_SIZE = 21;
/** More than any real configuration holds; bounds loops on corrupt counts. */
const MAX_OBJECTS = 65536;

export enum ObjectType {
  ObjectTable = 1,
  KeyTable = 2,
  File = 3,
}

export enum KeyType {
  Free = 1,
  Int = 3,
  UInt = 4,
  Double = 5,
  String = 6,
  Array = 7,
  Bool = 8,
  Node = 9,
}

export type VmcxValue = bigint | number | string | boolean | Buffer | undefined;

export interface VmcxNode {
  key: string;
  type: number;
  /** Scalar value; undefined for nodes. */
  value: VmcxValue;
  children: Map<string, VmcxNode>;
}

interface RawEntry {
  node: VmcxNode;
  parentTable: number;
  parentOffset: number;
}

interface KeyTable {
  index: number;
  sequence: number;
  entries: Map<number, RawEntry>;
}

/** The decoded tree: its root's children are the top-level keys (usually just 'configuration'). */
export interface VmcxFile {
  version: number;
  root: VmcxNode;
}

function u64(buf: Buffer, off: number): number {
  const v = buf.readBigUInt64LE(off);
  return v > BigInt(Number.MAX_SAFE_INTEGER) ? Number.MAX_SAFE_INTEGER : Number(v);
}

export function isVmcx(head: Buffer): boolean {
  return head.length >= 4 && head.readUInt32LE(0) === STORAGE_SIGNATURE;
}

export function parseVmcx(buf: Buffer, file: string): VmcxFile {
  const corrupt = (why: string) => new CorruptImageError(`corrupt VMCX file: ${why}`, file);
  if (buf.length < OBJECT_TABLE_OFFSET + 8) throw corrupt(`file is too short (${buf.length} bytes)`);

  const headers = HEADER_OFFSETS.map((off) => ({
    signature: buf.readUInt32LE(off),
    sequence: buf.readUInt16LE(off + 8),
    version: buf.readUInt32LE(off + 10),
    alignment: buf.readUInt32LE(off + 22),
  })).filter((h) => h.signature === STORAGE_SIGNATURE);
  if (headers.length === 0) throw corrupt('no storage header with signature 0x01282014');
  const header = headers.reduce((a, b) => (b.sequence > a.sequence ? b : a));
  if (header.version !== 0x400) {
    throw new UnsupportedFeatureError(
      `VMCX storage version 0x${header.version.toString(16)} is not supported (only 0x400)`,
      file,
    );
  }

  // Object tables (the first at 0x2000; it may name more).
  const keyTables = new Map<number, KeyTable>();
  const fileObjects = new Map<number, number>();
  const pendingTables = [OBJECT_TABLE_OFFSET];
  const seenTables = new Set<number>();
  let objectCount = 0;
  while (pendingTables.length > 0) {
    const tableOffset = pendingTables.shift()!;
    if (seenTables.has(tableOffset)) continue;
    seenTables.add(tableOffset);
    if (tableOffset + 8 > buf.length)
      throw corrupt(`object table at 0x${tableOffset.toString(16)} lies beyond the end of the file`);
    if (buf.readUInt32LE(tableOffset) !== OBJECT_TABLE_SIGNATURE) {
      throw corrupt(`bad object table signature at 0x${tableOffset.toString(16)}`);
    }
    const count = buf.readUInt32LE(tableOffset + 4);
    if (count > MAX_OBJECTS || tableOffset + 8 + count * OBJECT_ENTRY_SIZE > buf.length) {
      throw corrupt(`object table at 0x${tableOffset.toString(16)} claims ${count} entries, more than the file holds`);
    }
    for (let i = 0; i < count; i++) {
      if (++objectCount > MAX_OBJECTS) throw corrupt('too many objects');
      const e = tableOffset + 8 + i * OBJECT_ENTRY_SIZE;
      const type = buf.readUInt8(e);
      const offset = u64(buf, e + 5);
      const size = buf.readUInt32LE(e + 13);
      const allocated = buf.readUInt8(e + 17);
      if (allocated === 0) continue;
      if (type !== ObjectType.ObjectTable && type !== ObjectType.KeyTable && type !== ObjectType.File) continue;
      if (offset + size > buf.length || size === 0) {
        throw corrupt(
          `object ${i} (type ${type}) at 0x${offset.toString(16)}+0x${size.toString(16)} lies beyond the end of the file`,
        );
      }
      if (type === ObjectType.ObjectTable) pendingTables.push(offset);
      else if (type === ObjectType.File) fileObjects.set(offset, size);
      else {
        const table = parseKeyTable(buf.subarray(offset, offset + size), offset, corrupt, (ptrOffset, ptrSize) => {
          if (ptrOffset + ptrSize > buf.length)
            throw corrupt(`value at 0x${ptrOffset.toString(16)} lies beyond the end of the file`);
          return buf.subarray(ptrOffset, ptrOffset + ptrSize);
        });
        const existing = keyTables.get(table.index);
        if (!existing || table.sequence > existing.sequence) keyTables.set(table.index, table);
      }
    }
  }
  if (keyTables.size === 0) throw corrupt('no key tables');

  const root: VmcxNode = { key: '', type: KeyType.Node, value: undefined, children: new Map() };
  for (const table of keyTables.values()) {
    for (const entry of table.entries.values()) {
      let parent: VmcxNode = root;
      if (entry.parentTable !== 0) {
        const p = keyTables.get(entry.parentTable)?.entries.get(entry.parentOffset);
        if (!p) {
          throw corrupt(
            `key '${entry.node.key}' names a parent at table ${entry.parentTable} offset 0x${entry.parentOffset.toString(16)} that does not exist`,
          );
        }
        parent = p.node;
      }
      parent.children.set(entry.node.key, entry.node);
    }
  }
  // A parent chain that loops never reaches the root; detect it so walks terminate.
  for (const table of keyTables.values()) {
    for (const entry of table.entries.values()) {
      let steps = 0;
      let cur: RawEntry | undefined = entry;
      while (cur && cur.parentTable !== 0) {
        if (++steps > 1024) throw corrupt(`key '${entry.node.key}' has a parent chain that loops`);
        cur = keyTables.get(cur.parentTable)?.entries.get(cur.parentOffset);
      }
    }
  }
  return { version: header.version, root };
}

function parseKeyTable(
  raw: Buffer,
  fileOffset: number,
  corrupt: (why: string) => Error,
  readFileObject: (offset: number, size: number) => Buffer,
): KeyTable {
  if (raw.length < KEY_TABLE_HEADER_SIZE || raw.readUInt16LE(0) !== KEY_TABLE_SIGNATURE) {
    throw corrupt(`bad key table signature at 0x${fileOffset.toString(16)}`);
  }
  const table: KeyTable = { index: raw.readUInt16LE(2), sequence: raw.readUInt16LE(4), entries: new Map() };
  let off = KEY_TABLE_HEADER_SIZE;
  while (off + KEY_ENTRY_HEADER_SIZE <= raw.length) {
    const typeWord = raw.readUInt16LE(off);
    const size = raw.readUInt32LE(off + 2);
    if (size === 0) break;
    const where = `key table entry at 0x${(fileOffset + off).toString(16)}`;
    if (size < KEY_ENTRY_HEADER_SIZE || off + size > raw.length) throw corrupt(`${where} has size ${size}, outside its table`);
    const type = typeWord & 0xff;
    const flags = typeWord >> 8;
    if (type !== KeyType.Free) {
      const parentTable = raw.readUInt16LE(off + 6);
      const parentOffset = raw.readUInt32LE(off + 8);
      const dataOffset = raw.readUInt8(off + 20);
      const body = raw.subarray(off + KEY_ENTRY_HEADER_SIZE, off + size);
      if (dataOffset < 1 || dataOffset > body.length) throw corrupt(`${where} has its value outside the entry`);
      const key = body.subarray(0, dataOffset - 1).toString('utf8');
      let data = body.subarray(dataOffset);
      const need = (n: number) => {
        if (data.length < n) throw corrupt(`${where} ('${key}') is too short for its value`);
      };
      let value: VmcxValue;
      if ((flags & 1) !== 0 && (type === KeyType.String || type === KeyType.Array)) {
        need(12);
        const len = data.readUInt32LE(0);
        const ptr = u64(data, 4);
        data = readFileObject(ptr, len);
      } else if (type === KeyType.String || type === KeyType.Array) {
        need(4);
        const len = data.readUInt32LE(0);
        need(4 + len);
        data = data.subarray(4, 4 + len);
      }
      switch (type) {
        case KeyType.Int:
          need(8);
          value = data.readBigInt64LE(0);
          break;
        case KeyType.UInt:
          need(8);
          value = data.readBigUInt64LE(0);
          break;
        case KeyType.Double:
          need(8);
          value = data.readDoubleLE(0);
          break;
        case KeyType.String:
          value = data.toString('utf16le').replace(/\0+$/, '');
          break;
        case KeyType.Array:
          value = Buffer.from(data);
          break;
        case KeyType.Bool:
          need(4);
          value = data.readUInt32LE(0) !== 0;
          break;
        default:
          value = undefined;
      }
      table.entries.set(off, { node: { key, type, value, children: new Map() }, parentTable, parentOffset });
    }
    off += size;
  }
  return table;
}

/** The node at a slash-separated path below `node`, or undefined. */
export function vmcxGet(node: VmcxNode, path: string): VmcxNode | undefined {
  let cur: VmcxNode | undefined = node;
  for (const part of path.split('/')) {
    if (!part) continue;
    cur = cur?.children.get(part);
    if (!cur) return undefined;
  }
  return cur;
}

/** Every leaf as 'path = value', for dumps and the report's unmapped list. */
export function vmcxFlatten(node: VmcxNode, prefix = ''): { key: string; value: VmcxValue }[] {
  const out: { key: string; value: VmcxValue }[] = [];
  for (const child of node.children.values()) {
    const path = prefix ? `${prefix}/${child.key}` : child.key;
    if (child.type === KeyType.Node) out.push(...vmcxFlatten(child, path));
    else out.push({ key: path, value: child.value });
  }
  return out;
}
