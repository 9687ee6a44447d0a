import type { Socket } from 'node:net';

/**
 * Ends a socket politely and resolves once it is closed; a peer that does not answer the FIN
 * within `graceMs` has the socket destroyed instead (so close() never hangs on a dead peer).
 */
export function endSocket(socket: Socket, graceMs = 1000): Promise<void> {
  return new Promise<void>((resolve) => {
    if (socket.destroyed) return resolve();
    socket.once('close', () => resolve());
    socket.end();
    setTimeout(() => {
      socket.destroy();
      resolve();
    }, graceMs).unref();
  });
}
