// Types of the lipsync-engine Node.js client (index.js).
export const VERSION: number;
export class EngineError extends Error { code: string; engineMessage: string; id: unknown; }
export class EngineTimeout extends Error {}
export interface Frame { number: number; jpeg: Buffer; pts_ms: number; late_ms: number; idle: boolean; last: boolean; avatar_frame: number; }
export class Reply {
  id: unknown; status: 'ok' | 'error'; result: Record<string, any>; error: { code: string; message: string } | null;
  event: string | null; stream: string | null; header: Record<string, any>;
  buffers: { desc: Record<string, any>; data: Buffer }[]; readonly ok: boolean;
}
export interface BatchOptions { startFrame?: number; wrap?: 'pingpong' | 'modulo'; visualFrames?: { shape: number[]; data: Float32Array }; }
export class Stream {
  id: string; info: Record<string, any>; busyRetries: number;
  push(pcm: Int16Array | Float32Array, opts?: { end?: boolean }): Promise<Record<string, any>>;
  frames(): AsyncGenerator<Frame>;
  flush(): Promise<{ stream: string; frames_dropped: number; audio_dropped_s: number; next_frame: number }>;
  close(): Promise<Record<string, any>>;
}
export class Client {
  constructor(endpoint: string, opts?: { timeout?: number; serverKey?: string; clientKey?: string });
  submit(method: string, params?: Record<string, any>, buffers?: { name: string; dtype: string; shape: number[]; data: ArrayBufferView }[]): Promise<Reply>;
  call(method: string, params?: Record<string, any>, buffers?: { name: string; dtype: string; shape: number[]; data: ArrayBufferView }[]): Promise<Reply>;
  composite(model: string, audioFeatures: Float32Array, batchSize: number, opts?: BatchOptions): Promise<{ result: Record<string, any>; frames: Buffer[] }>;
  infer(model: string, audioFeatures: Float32Array, batchSize: number, opts?: BatchOptions): Promise<{ result: Record<string, any>; shape: number[]; output: Float32Array }>;
  health(): Promise<Record<string, any>>;
  models(): Promise<Record<string, any>[]>;
  load(model: string): Promise<Record<string, any>>;
  unload(model: string): Promise<Record<string, any>>;
  openStream(model: string, opts?: { realtime?: boolean; startFrame?: number; wrap?: string; idleFrames?: boolean }): Promise<Stream>;
  close(): void;
}
export function readKey(path: string, which: 'public' | 'secret'): string;
