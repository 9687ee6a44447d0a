/**
 * qemu's NBD URI syntax: nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, and the TLS
 * variants nbds:// and nbds+unix:// (TLS with the system CAs, or ?tls-ca=PEM-FILE, ?tls-servername=,
 * ?tls-cert= / ?tls-key= for a client certificate, ?tls-insecure=1 to skip verification).
 */
import { UsageError } from '../../disk/errors.js';

export interface NbdTlsOptions {
  ca?: string;
  cert?: string;
  key?: string;
  servername?: string;
  insecure?: boolean;
}

export interface NbdAddress {
  /** A TCP endpoint... */
  host?: string;
  port?: number;
  /** ...or a UNIX socket. */
  socket?: string;
  exportName: string;
  tls?: NbdTlsOptions;
}

export const NBD_DEFAULT_PORT = 10809;

export function isNbdUri(name: string): boolean {
  return /^nbds?(\+(tcp|unix))?:\/\//i.test(name);
}

export function parseNbdUri(uri: string): NbdAddress {
  const m = /^(nbds?)(?:\+(tcp|unix))?:\/\/([^/?#]*)(\/[^?#]*)?(?:\?([^#]*))?$/i.exec(uri);
  if (!m) throw new UsageError(`not an NBD URI (nbd://HOST:PORT/EXPORT or nbd+unix:///EXPORT?socket=PATH)`, uri);
  const tlsWanted = m[1]!.toLowerCase() === 'nbds';
  const transport = (m[2] ?? 'tcp').toLowerCase();
  const authority = m[3] ?? '';
  const exportName = decodeURIComponent((m[4] ?? '/').slice(1));
  const query = new URLSearchParams(m[5] ?? '');
  const tls: NbdTlsOptions | undefined = tlsWanted
    ? {
        ca: query.get('tls-ca') ?? undefined,
        cert: query.get('tls-cert') ?? undefined,
        key: query.get('tls-key') ?? undefined,
        servername: query.get('tls-servername') ?? undefined,
        insecure: query.get('tls-insecure') === '1',
      }
    : undefined;
  if (transport === 'unix') {
    const socket = query.get('socket');
    if (authority) throw new UsageError('nbd+unix URIs take no host: nbd+unix:///EXPORT?socket=PATH', uri);
    if (!socket) throw new UsageError('nbd+unix URIs need ?socket=PATH', uri);
    return { socket, exportName, tls };
  }
  if (!authority) throw new UsageError('nbd:// URIs need a host: nbd://HOST[:PORT]/EXPORT', uri);
  let host = authority;
  let port = NBD_DEFAULT_PORT;
  const v6 = /^\[([^\]]+)\](?::(\d+))?$/.exec(authority);
  if (v6) {
    host = v6[1]!;
    if (v6[2]) port = Number(v6[2]);
  } else {
    const hp = /^([^:]+)(?::(\d+))?$/.exec(authority);
    if (!hp) throw new UsageError(`bad host '${authority}' in NBD URI`, uri);
    host = hp[1]!;
    if (hp[2]) port = Number(hp[2]);
  }
  if (!(port > 0 && port < 65536)) throw new UsageError(`bad port in NBD URI`, uri);
  return { host, port, exportName, tls };
}
