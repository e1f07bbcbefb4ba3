"""Pipecat 1.14's side of the sweep: the same echo, served the way Pipecat serves sessions.

FastAPI + uvicorn (uvloop, httptools), one ``FastAPIWebsocketTransport`` and one pipeline
per websocket connection (Pipecat's documented multi-session pattern):

    transport.input() -> Echo -> transport.output()

Same frames and formats as duplexd's sweep: raw pcm16 24 kHz 20 ms frames in, pcm16
24 kHz out. As in duplexd (whose engine runs at 16 kHz), the pipeline runs at 16 kHz: the
serializer converts input with Pipecat's own stream resampler (what its telephony
serializers do), Echo turns each InputAudioRawFrame into an OutputAudioRawFrame, and the
output transport converts back to 24 kHz and sends 40 ms chunks at real-time pace
(Pipecat's default ``audio_out_10ms_chunks`` = 4). No VAD, no metrics, no RTVI.

Run with the clients venv: ``.venv-clients/bin/python -m tests.bench.pipecat_echo PORT``.
"""

from __future__ import annotations

import sys

import uvicorn
from fastapi import FastAPI, WebSocket
from loguru import logger
from pipecat.audio.utils import create_stream_resampler
from pipecat.frames.frames import Frame, InputAudioRawFrame, OutputAudioRawFrame
from pipecat.pipeline.pipeline import Pipeline
from pipecat.pipeline.runner import PipelineRunner
from pipecat.pipeline.task import PipelineParams, PipelineTask
from pipecat.processors.frame_processor import FrameDirection, FrameProcessor, FrameProcessorSetup
from pipecat.serializers.base_serializer import FrameSerializer
from pipecat.transports.websocket.fastapi import FastAPIWebsocketParams, FastAPIWebsocketTransport

CLIENT_RATE = 24000
PIPELINE_RATE = 16000


class RawPcmSerializer(FrameSerializer):
    """Binary websocket messages are raw pcm16 mono at the client rate, both ways."""

    def __init__(self) -> None:
        super().__init__()
        self._resampler = create_stream_resampler()
        self._rate = PIPELINE_RATE

    async def setup(self, setup: FrameProcessorSetup) -> None:
        self._rate = setup.audio_in_sample_rate or PIPELINE_RATE

    async def serialize(self, frame: Frame) -> str | bytes | None:
        if isinstance(frame, OutputAudioRawFrame):
            return frame.audio  # the output transport already converted it to the client rate
        return None

    async def deserialize(self, data: str | bytes) -> Frame | None:
        if not isinstance(data, bytes) or not data:
            return None
        pcm = await self._resampler.resample(data, CLIENT_RATE, self._rate)
        if not pcm:
            return None
        return InputAudioRawFrame(audio=pcm, sample_rate=self._rate, num_channels=1)


class Echo(FrameProcessor):
    """The trivial step: every input audio frame goes back out."""

    async def process_frame(self, frame: Frame, direction: FrameDirection) -> None:
        await super().process_frame(frame, direction)
        if isinstance(frame, InputAudioRawFrame):
            await self.push_frame(
                OutputAudioRawFrame(audio=frame.audio, sample_rate=frame.sample_rate, num_channels=1)
            )
        else:
            await self.push_frame(frame, direction)


app = FastAPI()


@app.get("/health")
async def health() -> dict[str, str]:
    return {"status": "ok"}


@app.websocket("/ws")
async def session(websocket: WebSocket) -> None:
    await websocket.accept()
    transport = FastAPIWebsocketTransport(
        websocket=websocket,
        params=FastAPIWebsocketParams(
            audio_in_enabled=True,
            audio_out_enabled=True,
            add_wav_header=False,
            serializer=RawPcmSerializer(),
        ),
    )
    pipeline = Pipeline([transport.input(), Echo(), transport.output()])
    task = PipelineTask(
        pipeline,
        params=PipelineParams(
            audio_in_sample_rate=PIPELINE_RATE,
            audio_out_sample_rate=CLIENT_RATE,
            enable_metrics=False,
            enable_usage_metrics=False,
        ),
        enable_rtvi=False,
        enable_turn_tracking=False,
        idle_timeout_secs=None,
        cancel_on_idle_timeout=False,
    )

    @transport.event_handler("on_client_disconnected")
    async def _gone(_transport: object, _ws: object) -> None:
        await task.cancel()

    await PipelineRunner(handle_sigint=False).run(task)


def main() -> None:
    logger.remove()
    logger.add(sys.stderr, level="WARNING")  # Pipecat logs every frame processor at DEBUG
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", loop="uvloop", http="httptools")


if __name__ == "__main__":
    main()
